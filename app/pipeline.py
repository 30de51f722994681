"""Batch processing of document changes and read misses, independent of Kafka.

The Faust agents hand each batch of raw records (:class:`Envelope`) to a processor
and acknowledge the batch only once ``process`` returns, which it does only after
every record's outcome is committed in PostgreSQL or the record is on the
dead-letter topic.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from segue import metrics, providers
from segue.engine import URGENT, Embedded, EmbeddingEngine
from segue.errors import ModelHalted, ProviderError
from segue.spec import ModelSpec
from segue.isolation import process_isolating_poison, retry_forever
from segue.settings import Settings
from segue.batches import ChangeEvent, Envelope, highest_versions, latest_per_document, split_rounds
from segue.store import ChangelogRow, DeleteRow, DocumentRow, Store, StoredDocument, VectorRow
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import (
    DeadLetterReason,
    InvalidEvent,
    ReadMiss,
    decode_change,
    decode_read_miss,
)

log = logging.getLogger("segue.pipeline")

PRIORITY_READ_MISS = URGENT  # while these come, the engine cuts changes and backfill into shorter chunks
PRIORITY_CHANGE = 1
PRIORITY_BACKFILL = 2


class DeadLetterSink(Protocol):
    """Publishes records that cannot be processed, with their reasons, to the dead-letter topic."""

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Return once the broker acknowledged every letter; raise if any was not."""


@dataclass(frozen=True)
class DeadLetter:
    envelope: Envelope
    reason: DeadLetterReason
    error: str
    origin: Origin
    model_version: int | None = None
    event_id: str | None = None


def content_sha256(text: str) -> bytes:
    """The hash a vector is tied to: sha256 of the UTF-8 body."""
    return hashlib.sha256(text.encode()).digest()


def _model_slots(models: Sequence[ModelSpec]) -> list[int | None]:
    """One changelog slot per live model; a single model-less slot when none is registered."""
    return [m.version for m in models] or [None]


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Processor:
    """What both processors share: the store, the engine and dead-lettering."""

    origin: Origin
    topic_setting: str  # the setting that names the topic it reads (a label on its metrics)

    def __init__(self, settings: Settings, store: Store, engine: EmbeddingEngine, dead_letters: DeadLetterSink):
        self.topic = getattr(settings, self.topic_setting)
        self.settings = settings
        self.store = store
        self.engine = engine
        self.dead_letters = dead_letters

    async def _live_models(self) -> list[ModelSpec]:
        """The live models Segue computes vectors for (adopted ones are read-only), loaded and warm; retired
        ones are freed from the engine.

        A model that cannot load raises :class:`~segue.errors.ModelUnavailable`, which the
        isolation retries (an outage of that model), never dead-letters.
        """
        models = await self.store.computed_models()
        await self.engine.unload(keep=[m.version for m in models])
        await self.engine.ensure_loaded(models)
        return models

    async def _isolate(self, items, process, on_poison) -> None:
        await process_isolating_poison(
            items,
            process,
            on_poison,
            attempts=self.settings.retry_attempts,
            backoff_s=self.settings.retry_backoff_s,
            label=self.topic,
        )

    def _committed(self, outcomes: Sequence[tuple[Envelope, Action]], vectors: Mapping[str, int]) -> None:
        """Count what a committed transaction did: each record's outcome, and the vectors written per model."""
        for envelope, action in outcomes:
            metrics.count_outcome(self.origin.value, envelope.source.topic, action.value, envelope.latency_ms())
        for model, count in vectors.items():
            metrics.VECTORS_WRITTEN.labels(model).inc(count)

    async def _dead_letter(self, letters: Sequence[DeadLetter], extra_rows: Sequence[ChangelogRow] = ()) -> None:
        """Publish to the dead-letter topic, then record ``dead_lettered`` rows (and ``extra_rows``).

        A broker that does not acknowledge is an outage: the send is retried until it does.
        Each changelog row is recorded on its own if the batch of them fails, so one row
        cannot lose the others.
        """
        if not letters:
            return
        for letter in letters:
            log.warning(
                "dead-lettering %s[%d]@%d: %s: %s",
                letter.envelope.source.topic,
                letter.envelope.source.partition,
                letter.envelope.source.offset,
                letter.reason.value,
                letter.error[:500],
            )
        await retry_forever(lambda: self.dead_letters.send(letters), what=f"publishing {len(letters)} dead letters",
                            backoff_s=max(self.settings.retry_backoff_s, 0.1), label=self.topic)
        rows = list(extra_rows) + [
            ChangelogRow(
                doc_id=letter.envelope.key_text(),
                model_version=letter.model_version,
                action=Action.DEAD_LETTERED,
                origin=letter.origin,
                event_id=letter.event_id,
                latency_ms=letter.envelope.latency_ms(),
                error=f"{letter.reason.value}: {letter.error}",
            )
            for letter in letters
        ]

        async def record(batch: Sequence[ChangelogRow]) -> None:
            async with self.store.transaction() as tx:
                await tx.log(batch)

        async def unrecordable(row: ChangelogRow, error: BaseException) -> None:
            log.error("could not record the changelog row of a dead letter (%s for %r): %s",
                      row.action, row.doc_id, error)

        await self._isolate(rows, record, unrecordable)
        for letter in letters:
            topic = letter.envelope.source.topic
            failed = letter.reason is DeadLetterReason.PROCESSING_FAILED
            metrics.DEAD_LETTERS.labels(topic, letter.reason.value).inc()
            metrics.count_outcome(self.origin.value, topic, "failed" if failed else "dead_lettered",
                                  letter.envelope.latency_ms(), letter.reason.value)


class ChangeProcessor(_Processor):
    """Dual-writes document changes: every live model, one transaction per batch."""

    origin = Origin.CHANGE
    topic_setting = "topic_document_changes"

    async def process(self, envelopes: Sequence[Envelope]) -> None:
        """Apply a batch of document-changes records; returns once every outcome is durable."""
        events: list[ChangeEvent] = []
        invalid: list[DeadLetter] = []
        for envelope in envelopes:
            try:
                change = decode_change(envelope.key, envelope.value, max_text_bytes=self.settings.max_text_bytes)
            except InvalidEvent as error:
                invalid.append(DeadLetter(envelope, error.reason, str(error), self.origin))
                continue
            events.append(ChangeEvent(envelope, change))
        await self._dead_letter(invalid)
        for round_ in split_rounds(events):
            await self._isolate(round_, self._apply, self._poison)

    def _row(self, event: ChangeEvent, model_version: int | None, action: Action, error: str | None = None,
             tokens: tuple[int, int] | None = None):
        return ChangelogRow(
            doc_id=event.change.doc_id,
            model_version=model_version,
            action=action,
            origin=self.origin,
            doc_version=event.change.version,
            event_id=event.change.event_id,
            latency_ms=event.envelope.latency_ms(),
            error=error,
            tokens_used=tokens[0] if tokens else None,
            tokens_total=tokens[1] if tokens else None,
        )

    async def _embed_available(self, model: ModelSpec, texts: list[str]) -> Embedded | BaseException:
        """``texts`` embedded with ``model``, or the outage that keeps its API from answering now.

        An API outage or a halted model must not hold up the other models' writes: the
        documents are written without this model's vector (a ``failed`` changelog row says
        why) and the sweeper re-enqueues them once ``sweeper_retry_failed_after_s`` passed.
        """
        try:
            return await self.engine.embed_counted(model, texts, priority=PRIORITY_CHANGE)
        except (ProviderError, ModelHalted) as error:
            log.warning("model %s is unavailable; writing this batch's changes without its vectors: %s",
                        model.name, error)
            return error

    async def _apply(self, events: Sequence[ChangeEvent]) -> None:
        models = await self._live_models()
        winners, superseded = latest_per_document(events)
        seen = highest_versions(events)
        stored = await self.store.fetch([e.change.doc_id for e in winners], models)

        upserts: list[tuple[ChangeEvent, bytes, list[ModelSpec]]] = []
        deletes: list[ChangeEvent] = []
        for event in winners:
            known = stored[event.change.doc_id].newest_known_version()
            if event.change.version is not None and known is not None and event.change.version <= known:
                superseded.append(event)
            elif event.change.is_delete:
                deletes.append(event)
            else:
                sha = content_sha256(event.change.text)
                held = stored[event.change.doc_id].model_sha256
                upserts.append((event, sha, [m for m in models if held.get(m.version) != sha]))

        todo = {m.version: [event for event, _, needed in upserts if m in needed] for m in models}
        results = await asyncio.gather(*(self._embed_available(m, [e.change.text for e in todo[m.version]])
                                         for m in models if todo[m.version]))
        vectors: dict[tuple[str, int], object] = {}
        tokens: dict[tuple[str, int], tuple[int, int]] = {}
        unavailable: dict[int, str] = {}
        for model, result in zip([m for m in models if todo[m.version]], results):
            if isinstance(result, BaseException):
                unavailable[model.version] = f"provider_unavailable: {_error_text(result)}"
                continue
            for event, vector, used, total in zip(todo[model.version], result.vectors, result.tokens_used(model),
                                                  result.tokens):
                vectors[(event.change.doc_id, model.version)] = vector
                tokens[(event.change.doc_id, model.version)] = (used, total)
        failed = {(event.change.doc_id, version) for version in unavailable for event in todo[version]}
        upserts = [(event, sha, [m for m in needed if m.version not in unavailable]) for event, sha, needed in upserts]

        rows = [
            DocumentRow(
                doc_id=event.change.doc_id,
                body=event.change.text,
                version=event.change.version,
                content_sha256=sha,
                metadata=event.change.metadata,
                source=event.envelope.source,
                vectors={m.version: vectors[(event.change.doc_id, m.version)] for m in needed},
            )
            for event, sha, needed in upserts
        ]
        slots = _model_slots(models)
        async with self.store.transaction() as tx:
            applied = await tx.upsert_documents(rows, models)
            deleted = await tx.delete_documents(
                [DeleteRow(e.change.doc_id, e.change.version, seen.get(e.change.doc_id), e.envelope.source)
                 for e in deletes])
            changelog: list[ChangelogRow] = []
            outcomes: list[tuple[Envelope, Action]] = []
            written: Counter[str] = Counter()
            for event, _, needed in upserts:
                if event.change.doc_id not in applied:
                    changelog += [self._row(event, v, Action.SUPERSEDED) for v in slots]
                    outcomes.append((event.envelope, Action.SUPERSEDED))
                    continue
                needed_versions = {m.version for m in needed}
                doc_id = event.change.doc_id
                for v in slots:
                    if v in needed_versions:
                        changelog.append(self._row(event, v, Action.EMBEDDED, tokens=tokens[(doc_id, v)]))
                    elif (doc_id, v) in failed:
                        changelog.append(self._row(event, v, Action.FAILED, unavailable[v]))
                    else:
                        changelog.append(self._row(event, v, Action.UNCHANGED))
                outcomes.append((event.envelope, Action.EMBEDDED if needed else Action.UNCHANGED))
                written.update(m.name for m in needed)
            for event in deletes:
                absent_already = stored[event.change.doc_id].version is None
                action = Action.DELETED if event.change.doc_id in deleted or absent_already else Action.SUPERSEDED
                changelog += [self._row(event, v, action) for v in slots]
                outcomes.append((event.envelope, action))
            for event in superseded:
                changelog += [self._row(event, v, Action.SUPERSEDED) for v in slots]
                outcomes.append((event.envelope, Action.SUPERSEDED))
            await tx.log(changelog)
        self._committed(outcomes, written)

    async def _poison(self, event: ChangeEvent, error: BaseException) -> None:
        models = await self.store.computed_models()
        failed = [self._row(event, v, Action.FAILED, _error_text(error)) for v in _model_slots(models)]
        letter = DeadLetter(event.envelope, DeadLetterReason.PROCESSING_FAILED, _error_text(error), self.origin,
                            event_id=event.change.event_id)
        await self._dead_letter([letter], failed)


@dataclass(frozen=True)
class ReadMissEvent:
    envelope: Envelope
    miss: ReadMiss
    model: ModelSpec


class ReadMissProcessor(_Processor):
    """Re-embeds the stored body of documents a reader found without a current vector."""

    origin = Origin.READ_MISS
    topic_setting = "topic_read_misses"
    priority = PRIORITY_READ_MISS

    async def process(self, envelopes: Sequence[Envelope]) -> None:
        """Apply a batch of read-misses records; returns once every outcome is durable."""
        live = await self.store.live_models()
        models = {m.name: m for m in live if providers.embeds(m)}
        adopted = {m.name for m in live if not providers.embeds(m)}
        events: list[ReadMissEvent] = []
        invalid: list[DeadLetter] = []
        for envelope in envelopes:
            try:
                miss = decode_read_miss(envelope.value)
            except InvalidEvent as error:
                invalid.append(DeadLetter(envelope, error.reason, str(error), self.origin))
                continue
            model = models.get(miss.model)
            if model is None:
                why = (f"model {miss.model!r} holds adopted vectors and cannot re-embed: bind it to a provider "
                       "(segue models bind)" if miss.model in adopted else
                       f"no live model named {miss.model!r} (live: {', '.join(sorted(models)) or 'none'})")
                invalid.append(DeadLetter(envelope, DeadLetterReason.UNKNOWN_MODEL, why, self.origin,
                                          event_id=miss.event_id))
                continue
            events.append(ReadMissEvent(envelope, miss, model))
        await self._dead_letter(invalid)
        for model in models.values():
            mine = [e for e in events if e.model.version == model.version]
            if mine:
                await self._isolate(mine, self._apply, self._poison)

    def _row(self, event: ReadMissEvent, action: Action, doc_version: int | None = None, error: str | None = None,
             tokens: tuple[int, int] | None = None):
        return ChangelogRow(
            doc_id=event.miss.doc_id,
            model_version=event.model.version,
            action=action,
            origin=self.origin,
            doc_version=doc_version,
            event_id=event.miss.event_id,
            latency_ms=event.envelope.latency_ms(),
            error=error,
            tokens_used=tokens[0] if tokens else None,
            tokens_total=tokens[1] if tokens else None,
        )

    async def _apply(self, events: Sequence[ReadMissEvent]) -> None:
        model = events[0].model
        await self.engine.ensure_loaded([model])
        stored = await self.store.fetch(sorted({e.miss.doc_id for e in events}), [model], with_body=True)
        unknown = [e for e in events if stored[e.miss.doc_id].version is None]
        await self._unknown_documents(unknown)
        known = [e for e in events if stored[e.miss.doc_id].version is not None]
        todo: dict[str, StoredDocument] = {
            e.miss.doc_id: stored[e.miss.doc_id]
            for e in known
            if stored[e.miss.doc_id].model_sha256[model.version] != stored[e.miss.doc_id].content_sha256
        }
        docs = list(todo.values())
        try:
            embedded = await self.engine.embed_counted(model, [d.body for d in docs], priority=self.priority)
        except ModelHalted as error:  # until an operator acts: recorded, not retried; the sweeper comes back later
            await self._record_halted(known, stored, error)
            return
        tokens = dict(zip(todo, zip(embedded.tokens_used(model), embedded.tokens)))
        async with self.store.transaction() as tx:
            written = await tx.write_vectors(
                model, [VectorRow(d.doc_id, d.content_sha256, v) for d, v in zip(docs, embedded.vectors)]
            )
            changelog = []
            outcomes: list[tuple[Envelope, Action]] = []
            first_seen: set[str] = set()
            for event in known:
                doc = stored[event.miss.doc_id]
                if event.miss.doc_id in written and event.miss.doc_id not in first_seen:
                    action = Action.EMBEDDED
                elif event.miss.doc_id in todo and event.miss.doc_id not in written:
                    action = Action.SUPERSEDED
                else:
                    action = Action.UNCHANGED
                first_seen.add(event.miss.doc_id)
                counted = tokens[event.miss.doc_id] if action is Action.EMBEDDED else None
                changelog.append(self._row(event, action, doc.version, tokens=counted))
                outcomes.append((event.envelope, action))
            await tx.log(changelog)
        self._committed(outcomes, {model.name: len(written)})

    async def _record_halted(self, events: Sequence[ReadMissEvent], stored: Mapping[str, StoredDocument],
                             error: ModelHalted) -> None:
        async with self.store.transaction() as tx:
            await tx.log([self._row(e, Action.FAILED, stored[e.miss.doc_id].version, _error_text(error))
                          for e in events])
        self._committed([(e.envelope, Action.FAILED) for e in events], {})

    async def _unknown_documents(self, events: Sequence[ReadMissEvent]) -> None:
        """A reader asked for a document that does not exist: dead-letter it."""
        await self._dead_letter(
            [
                DeadLetter(e.envelope, DeadLetterReason.UNKNOWN_DOCUMENT, f"no document {e.miss.doc_id!r}",
                           self.origin, e.model.version, e.miss.event_id)
                for e in events
            ]
        )

    async def _poison(self, event: ReadMissEvent, error: BaseException) -> None:
        letter = DeadLetter(event.envelope, DeadLetterReason.PROCESSING_FAILED, _error_text(error), self.origin,
                            event.model.version, event.miss.event_id)
        await self._dead_letter([letter], [self._row(event, Action.FAILED, error=_error_text(error))])


class BackfillProcessor(ReadMissProcessor):
    """Re-embeds documents the backfill or the sweeper enqueued, behind read misses and changes."""

    origin = Origin.BACKFILL
    topic_setting = "topic_backfill"
    priority = PRIORITY_BACKFILL

    async def _unknown_documents(self, events: Sequence[ReadMissEvent]) -> None:
        """Deleted since it was enqueued: nothing to do, and nothing wrong."""
        if events:
            async with self.store.transaction() as tx:
                await tx.log([self._row(e, Action.SUPERSEDED) for e in events])
            self._committed([(e.envelope, Action.SUPERSEDED) for e in events], {})
