"""The Faust application: agents for changes, read misses and the backfill; the sweeper and index timers.

Each agent takes a batch, hands it to its processor in ``app.pipeline`` and moves on
(which is when Faust acks the batch) only after the processor returned, i.e. after
every outcome is committed in PostgreSQL or dead-lettered. Faust's ``take_events``
acks a batch even when the body raised, so the body never lets an error escape: it
retries the whole batch until it goes through. Delivery is at-least-once; the writes
are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import faust

from app import db, migration
from app.engine import EmbeddingEngine
from app.pipeline import BackfillProcessor, ChangeProcessor, Envelope, ReadMissProcessor
from app.settings import Settings
from app.store import Store
from schemas.events import DeadLetterReason, SourcePosition, encode_dead_letter, read_miss_value

log = logging.getLogger("segue.worker")

RETRY_DELAY_S = 2.0
READ_MISS_BATCH_S = 0.05  # read misses are latency-sensitive: batch only what is already there


def _envelope(event: faust.EventT) -> Envelope:
    message = event.message
    return Envelope(
        key=message.key,
        value=message.value,
        source=SourcePosition(message.topic, message.partition, message.offset),
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
    )


class KafkaDeadLetters:
    """Publishes dead letters and waits until the broker has them."""

    def __init__(self, topic: faust.TopicT):
        self._topic = topic

    async def send(self, envelope: Envelope, reason: DeadLetterReason, error: str) -> None:
        value = encode_dead_letter(
            reason=reason, error=error, source=envelope.source, key=envelope.key, payload=envelope.value
        )
        delivery = await self._topic.send(key=envelope.key, value=value)
        await delivery


async def _process_until_done(name: str, processor, envelopes: Sequence[Envelope]) -> None:
    """Never return before the batch is processed; an escaping error would ack it unprocessed."""
    while True:
        try:
            await processor.process(envelopes)
            return
        except Exception:  # noqa: BLE001 - retried, never swallowed: the batch stays unacked
            log.exception("%s: batch of %d failed outside isolation; retrying in %.0fs", name, len(envelopes),
                          RETRY_DELAY_S)
            await asyncio.sleep(RETRY_DELAY_S)


def create_app(settings: Settings, *, database_url: str, engine: EmbeddingEngine) -> faust.App:
    """Build the Faust app wired to ``database_url`` and an engine with the live models loaded."""
    app = faust.App(
        settings.group_id,
        broker=settings.faust_broker,
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=10.0,
        broker_commit_interval=1.0,
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    dead_letters = KafkaDeadLetters(raw_topic(settings.topic_dead_letters))
    changes = ChangeProcessor(settings, Store(settings, database_url), engine, dead_letters)
    read_misses = ReadMissProcessor(settings, Store(settings, database_url), engine, dead_letters)
    backfill = BackfillProcessor(settings, Store(settings, database_url), engine, dead_letters)
    sweeper_store = Store(settings, database_url)
    backfill_topic = raw_topic(settings.topic_backfill)

    @app.agent(raw_topic(settings.topic_document_changes), name="document-changes")
    async def document_changes(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_timeout_s):
            await _process_until_done("document-changes", changes, [_envelope(e) for e in events])

    @app.agent(raw_topic(settings.topic_read_misses), name="read-misses")
    async def read_miss_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=READ_MISS_BATCH_S):
            await _process_until_done("read-misses", read_misses, [_envelope(e) for e in events])

    @app.agent(backfill_topic, name="backfill")
    async def backfill_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_timeout_s):
            await _process_until_done("backfill", backfill, [_envelope(e) for e in events])

    @app.timer(settings.sweeper_interval_s)
    async def sweeper() -> None:
        """Re-enqueue vectors stale or missing for too long, so a lost message heals itself."""
        try:
            stragglers = await sweeper_store.stragglers(max_age_s=settings.sweeper_max_age_s, limit=1000)
            for doc_id, model in stragglers:
                await backfill_topic.send(key=doc_id.encode(), value=read_miss_value(doc_id, model, "sweeper"))
            if stragglers:
                log.info("sweeper re-enqueued %d stale or missing vectors", len(stragglers))
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("sweeper failed; retrying at the next tick")

    def build_index_when_covered() -> str | None:
        with db.connect(settings, database_url) as conn:
            return migration.build_index_when_covered(conn, min_coverage_pct=settings.index_min_coverage_pct,
                                                      m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction)

    @app.timer(settings.sweeper_interval_s)
    async def index_builder() -> None:
        """Build the new model's HNSW index (concurrently) once the migration's coverage allows."""
        try:
            message = await asyncio.to_thread(build_index_when_covered)
            if message:
                log.info("%s", message)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("index build failed; retrying at the next tick")

    return app
