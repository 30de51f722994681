"""The Faust application: agents for changes, read misses and the backfill; the sweeper and migration timers.

Each agent takes a batch, hands it to its processor in ``segue.worker.pipeline`` and moves on
(which is when Faust acks the batch) only after the processor returned, i.e. after
every outcome is committed in PostgreSQL or dead-lettered. Faust's ``take_events``
acks a batch even when the body raised, so the body never lets an error escape: it
retries the whole batch until it goes through. Delivery is at-least-once; the writes
are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import faust

from segue import metrics
from segue.agents.transport import SegueApp
from segue.control import bridging, indexes, migration
from segue.embedding.engine import EmbeddingEngine
from segue.errors import EngineStopped
from segue.quality import shadow
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import (
    REPLAY_HEADER,
    SourcePosition,
    dead_letter_key,
    encode_dead_letter,
    encode_read_miss,
)
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import changelog, connections
from segue.storage.documents import Store
from segue.worker import heartbeat, sweeper
from segue.worker.batches import Envelope
from segue.worker.isolation import retry_forever
from segue.worker.ops import WorkerState
from segue.worker.pipeline import (
    BackfillProcessor,
    ChangeProcessor,
    DeadLetter,
    ReadMissProcessor,
)

log = logging.getLogger("segue.worker")

RETRY_DELAY_S = 2.0
GPU_BATCH_SIZE = 512  # a GPU embeds this many abstracts in a fraction of a second: big batches keep it busy
CPU_BATCH_SIZE = 64  # two CPU cores take seconds for 64 abstracts of a small transformer
# Faust's take_events waits this long before every batch, even with events already buffered: a read miss
# that came while the previous batch ran pays it again (traced behind a backfill: 50 ms → 10 ms took a miss's
# age when its processing starts from p50 60 to 16 ms).
READ_MISS_BATCH_S = 0.01
WATCHDOG_INTERVAL_S = 5.0


def change_batch_size(settings: Settings) -> int:
    """Events a batch of the worker's agents takes at most: ``SEGUE_BATCH_SIZE``, else by the models' device.

    A bigger batch spreads its fixed cost (a fetch, a transaction, a commit) over more events, and a
    batch is acknowledged only once it is processed, so its time also holds up a rebalance: on a
    CPU, where 64 abstracts of a small transformer take seconds, the batches stay small.
    """
    if settings.batch_size is not None:
        return settings.batch_size
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GPU_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE


def _envelope(event: faust.EventT) -> Envelope:
    message = event.message
    headers = dict(message.headers.items() if hasattr(message.headers, "items") else message.headers or ())
    replay_of = headers.get(REPLAY_HEADER)
    return Envelope(
        key=message.key,
        value=message.value,
        source=SourcePosition(message.topic, message.partition, message.offset),
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        replay_of=replay_of.decode(errors="replace") if replay_of else None,
    )


async def _publish_all(topic: faust.TopicT, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    """Send ``records`` and return once the broker acknowledged every one (raise if any failed)."""
    deliveries = [await topic.send(key=key, value=value) for key, value in records]
    await asyncio.gather(*deliveries)


class KafkaDeadLetters:
    """Publishes dead letters and waits until the broker has them."""

    def __init__(self, topic: faust.TopicT):
        self._topic = topic

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        await _publish_all(self._topic, [
            (dead_letter_key(letter.envelope.key),
             encode_dead_letter(reason=letter.reason, error=letter.error, source=letter.envelope.source,
                                key=letter.envelope.key, payload=letter.envelope.value,
                                replay_of=letter.envelope.replay_of))
            for letter in letters
        ])


class Progress:
    """The last record processed on each topic-partition (offset, publication time), for the lag figures."""

    def __init__(self, state: WorkerState):
        self.state = state
        self.last: dict[tuple[str, int], tuple[int, float | None]] = {}

    async def process_until_done(self, name: str, processor, envelopes: Sequence[Envelope]) -> None:
        """Never return before the batch is processed; an escaping error would ack it unprocessed."""
        started = time.perf_counter()
        await retry_forever(lambda: processor.process(envelopes), what=f"{name}: a batch of {len(envelopes)}",
                            backoff_s=RETRY_DELAY_S, label=name)
        metrics.BATCH_SIZE.labels(name).observe(len(envelopes))
        metrics.BATCH_SECONDS.labels(name).observe(time.perf_counter() - started)
        self.state.processed(len(envelopes))
        for envelope in envelopes:
            source = envelope.source
            published = envelope.timestamp_ms / 1000 if envelope.timestamp_ms else None
            if source.offset >= self.last.get((source.topic, source.partition), (-1, None))[0]:
                self.last[(source.topic, source.partition)] = (source.offset, published)

    def lag(self, app: faust.App) -> dict[str, int]:
        """Records behind on each assigned partition (also set as gauges, with the lag in seconds)."""
        behind = {}
        for tp in app.consumer.assignment():
            highwater = app.consumer.highwater(tp)
            offset, published = self.last.get((tp.topic, tp.partition), (None, None))
            committed = app.monitor.tp_committed_offsets.get(tp)
            next_offset = offset + 1 if offset is not None else committed
            if highwater is None or next_offset is None:
                continue
            records = max(highwater - next_offset, 0)
            behind[f"{tp.topic}/{tp.partition}"] = records
            metrics.LAG_RECORDS.labels(tp.topic, str(tp.partition)).set(records)
            age = time.time() - published if records and published else 0.0
            metrics.LAG_SECONDS.labels(tp.topic, str(tp.partition)).set(max(age, 0.0))
        return behind


def create_app(settings: Settings, *, database_url: str, engine: EmbeddingEngine, state: WorkerState,
               metrics_url: str | None) -> faust.App:
    """Build the Faust app wired to ``database_url``, an engine with the live models loaded, and the
    worker's ``state`` (which its operations endpoint at ``metrics_url`` reads)."""
    datadir = settings.data_dir / "faust"
    try:
        datadir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RuntimeError(f"cannot create the worker's state folder {datadir} ({error}); set SEGUE_DATA_DIR") from None
    app = SegueApp(
        settings.group_id,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        broker=settings.faust_broker,
        store="memory://",
        datadir=str(datadir),
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
    heartbeat_store = Store(settings, database_url)
    backfill_topic = raw_topic(settings.topic_backfill)
    index_policy = indexes.IndexPolicy.from_settings(settings)
    progress = Progress(state)
    metrics.initialize([settings.topic_document_changes, settings.topic_read_misses, settings.topic_backfill])

    async def batch_size() -> int:
        """:func:`change_batch_size`, off the event loop: it may wait for the warm-up's import of torch."""
        return await asyncio.to_thread(change_batch_size, settings)
    started_at = datetime.now(timezone.utc)
    me = heartbeat.worker_id(started_at)

    @app.agent(raw_topic(settings.topic_document_changes), name="document-changes")
    async def document_changes(stream: faust.StreamT) -> None:
        size = await batch_size()
        log.info("batches of up to %d events", size)
        async for events in stream.take_events(size, within=settings.batch_timeout_s):
            await progress.process_until_done(settings.topic_document_changes, changes, [_envelope(e) for e in events])

    @app.agent(raw_topic(settings.topic_read_misses), name="read-misses")
    async def read_miss_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(await batch_size(), within=READ_MISS_BATCH_S):
            await progress.process_until_done(settings.topic_read_misses, read_misses, [_envelope(e) for e in events])

    @app.agent(backfill_topic, name="backfill")
    async def backfill_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(await batch_size(), within=settings.batch_timeout_s):
            await progress.process_until_done(settings.topic_backfill, backfill, [_envelope(e) for e in events])

    async def enqueue(model: ModelSpec, doc_ids: list[str]) -> None:
        await _publish_all(backfill_topic, [(d.encode(), encode_read_miss(d, model.name, "sweeper")) for d in doc_ids])

    @app.timer(settings.sweeper_interval_s)
    async def sweep_lost_reembeds() -> None:
        """Re-enqueue vectors stale or missing for too long, so a lost message heals itself."""
        try:
            published = await sweeper.sweep(
                sweeper_store, enqueue, max_age_s=settings.sweeper_max_age_s, scan_rows=settings.sweeper_scan_rows,
                retry_failed_after_s=settings.sweeper_retry_failed_after_s)
            for model, count in published.items():
                log.info("sweeper re-enqueued %d stale or missing %s vectors", count, model)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("sweeper failed; retrying at the next tick")

    def advance_the_migration() -> list[str]:
        """Mark the migration ready once its gate passes; build its HNSW index once coverage allows; drop logged
        queries past their retention."""
        with connections.connect(settings, database_url) as conn:
            before = migration.active_migration(conn)
            after = migration.refresh(conn)
            done = [f"migration {after.id} is ready for cutover"] if before and after.state != before.state else []
            built = indexes.build_when_covered(conn, index_policy)
            refit = bridging.refit_when_due(conn, settings)
            if refit is not None:
                done.append(f"adapter {refit.adapter_id} fitted on {refit.fitted.pairs} pairs: held-out retention "
                            f"{refit.fitted.retention:.1%} ({'usable' if refit.passed else 'refused'})")
            purged = shadow.purge(conn, retention_days=settings.query_log_retention_days)
            return done + ([built] if built else []) + ([f"purged {purged} logged queries"] if purged else [])

    @app.timer(settings.sweeper_interval_s)
    async def migration_steward() -> None:
        """Move the migration along what needs no operator: the ready state and the index (in a thread)."""
        try:
            for message in await asyncio.to_thread(advance_the_migration):
                log.info("%s", message)
        except Exception:  # noqa: BLE001 - the next tick tries again (index builds stop after repeated failures)
            log.exception("advancing the migration failed")

    @app.on_rebalance_complete.connect
    async def assigned(sender: faust.App, **kwargs) -> None:
        state.assigned = sorted(f"{tp.topic}/{tp.partition}" for tp in app.consumer.assignment())

    def migration_gauges() -> None:
        with connections.connect(settings, database_url) as conn:
            active = migration.active_migration(conn)
            for name in metrics.MIGRATION_STATES:
                metrics.MIGRATION_STATE.labels(name).set(int(name == (active.state if active else "none")))
            for row in changelog.progress(conn):
                metrics.COVERAGE.labels(row["model"]).set(float(row["coverage_pct"] or 0) / 100)

    billed_recorded: dict[int, int] = {}  # tokens per API model already recorded as 'billed' changelog rows

    async def record_billing() -> None:
        """Record the tokens the API models' endpoints billed since the last beat (model_spend sums them)."""
        billed = engine.billed_tokens()
        due = {version: tokens - billed_recorded.get(version, 0) for version, tokens in billed.items()
               if tokens > billed_recorded.get(version, 0)}
        if due:
            async with heartbeat_store.transaction() as tx:
                await tx.log([changelog.ChangelogRow(doc_id=None, model_version=version, action=Action.BILLED,
                                                     origin=Origin.CONTROL, tokens_used=tokens)
                              for version, tokens in due.items()])
            billed_recorded.update({version: billed[version] for version in due})

    @app.timer(settings.heartbeat_interval_s)
    async def report() -> None:
        """Heartbeat row, billing, lag and migration gauges: what the worker is doing, seen from outside."""
        try:
            lag = progress.lag(app)
            devices = engine.devices()
            await heartbeat.beat(await heartbeat_store.connection(), heartbeat.Beat(
                worker_id=me, started_at=started_at, state=state.state(), partitions=state.assigned or [],
                lag=lag, models=sorted(devices), device=", ".join(sorted(set(devices.values()))) or None,
                events_per_s=round(state.events_per_second(), 2), metrics_url=metrics_url, halted=engine.halted()))
            await record_billing()
            await asyncio.to_thread(migration_gauges)
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.exception("reporting the worker's state failed")

    @app.on_before_shutdown.connect
    async def say_stopped(sender: faust.App, **kwargs) -> None:
        """Write this worker's state as stopped (SIGTERM, Ctrl-C): segue status shows it stopped, not lost."""
        try:
            await heartbeat.stopped(await heartbeat_store.connection(), me)
        except Exception:  # noqa: BLE001 - a worker that cannot say so is shown lost once silent
            log.exception("recording that the worker stopped failed")

    @app.timer(WATCHDOG_INTERVAL_S)
    async def engine_watchdog() -> None:
        """A worker whose engine thread is gone cannot embed: crash it so its supervisor restarts it."""
        if not engine.alive:
            log.critical("the embedding engine's thread is gone; stopping the worker")
            await app.crash(EngineStopped("the embedding engine's thread is gone"))

    return app
