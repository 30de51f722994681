"""Batch processing of document changes and read misses, independent of Kafka.

The Faust agents hand each batch of raw records (:class:`Envelope`) to a processor
and acknowledge the batch only once ``process`` returns, which it does only after
every record's outcome is committed in PostgreSQL or the record is on the
dead-letter topic.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from psycopg import errors

from segue import metrics
from segue.embedding import providers
from segue.embedding.engine import URGENT, Embedded, EmbeddingEngine
from segue.errors import ModelHalted, ProviderError
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import (
    DeadLetterReason,
    InvalidEvent,
    ReadMiss,
    decode_change,
    decode_read_miss,
)
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage.changelog import ChangelogRow
from segue.storage.chunks import ChunkRow
from segue.storage.documents import (
    DeleteRow,
    DocumentRow,
    Store,
    StoredDocument,
    VectorRow,
)
from segue.worker import chunked
from segue.worker.batches import (
    ChangeEvent,
    Envelope,
    highest_versions,
    latest_per_document,
    split_rounds,
)
from segue.worker.chunked import ChunkedEmbedded
from segue.worker.isolation import process_isolating_poison, retry_forever

log = logging.getLogger("segue.worker.pipeline")

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
        await self.engine.unload(retired=[m.version for m in await self.store.retired_models()])
        await self.engine.ensure_loaded(models)
        return models

    async def _embed(self, model: ModelSpec, doc_ids: Sequence[str], texts: Sequence[str], *,
                     priority: int) -> Embedded:
        """Documents ``doc_ids`` (bodies ``texts``) embedded with ``model``: whole, or chunk by chunk for a chunked
        model (its chunk vectors in :attr:`~segue.worker.chunked.ChunkedEmbedded.chunks`)."""
        if model.chunked:
            return await chunked.embed_documents(
                self.engine, model, doc_ids, texts, priority=priority,
                known=functools.partial(self.store.known_chunk_vectors, model.version))
        return await self.engine.embed_counted(model, texts, priority=priority)

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
            metrics.DEAD_LETTERS.labels(topic, letter.reason.value).inc()
            if letter.reason is DeadLetterReason.INPUT_REJECTED:
                continue  # its record's outcome was counted when the other models' work was committed
            failed = letter.reason is DeadLetterReason.PROCESSING_FAILED
            metrics.count_outcome(self.origin.value, topic, "failed" if failed else "dead_lettered",
                                  letter.envelope.latency_ms(), letter.reason.value)


@dataclass(frozen=True)
class _Upsert:
    """A change that may write its document: its text's hash, and the models whose stored vector is not of it."""

    event: ChangeEvent
    sha: bytes
    needed: list[ModelSpec]
    fill_in: bool  # the document is stored at this version with this text: only its missing vectors are written

    @property
    def doc_id(self) -> str:
        return self.event.change.doc_id

    def embedded(self, batch: _BatchVectors) -> list[ModelSpec]:
        """The needed models that gave this text a vector."""
        return [m for m in self.needed if (self.doc_id, m.version) in batch.vectors]


@dataclass
class _BatchVectors:
    """What embedding a batch's upserts gave, by (doc_id, model version)."""

    vectors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    tokens: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # (used, before truncation)
    failed: dict[tuple[str, int], str] = field(default_factory=dict)  # why a needed model wrote no vector
    rejected: dict[tuple[str, int], str] = field(default_factory=dict)  # texts a model rejected: dead-lettered
    chunks: dict[tuple[str, int], list[ChunkRow]] = field(default_factory=dict)  # a chunked model's chunk vectors
    details: dict[tuple[str, int], dict] = field(default_factory=dict)  # and its changelog detail


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
             tokens: tuple[int, int] | None = None, detail: dict | None = None):
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
            detail=detail,
        )

    async def _embed_available(self, model: ModelSpec, upserts: list[_Upsert]) -> Embedded | BaseException:
        """The ``upserts``' texts embedded with ``model``, or the outage that keeps its API from answering now.

        An API outage or a halted model must not hold up the other models' writes: the
        documents are written without this model's vector (a ``failed`` changelog row says
        why) and the sweeper re-enqueues them once ``sweeper_retry_failed_after_s`` passed.
        """
        try:
            return await self._embed(model, [u.doc_id for u in upserts], [u.event.change.text for u in upserts],
                                     priority=PRIORITY_CHANGE)
        except (ProviderError, ModelHalted) as error:
            log.warning("model %s is unavailable; writing this batch's changes without its vectors: %s",
                        model.name, error)
            return error

    async def _apply(self, events: Sequence[ChangeEvent]) -> None:
        models = await self._live_models()
        winners, superseded = latest_per_document(events)
        seen = highest_versions(events)
        stored = await self.store.fetch([e.change.doc_id for e in winners], models)
        upserts, deletes = self._sort_out(winners, stored, models, superseded)
        embedded = await self._embed_upserts(upserts, models)
        slots = _model_slots(models)
        async with self.store.transaction() as tx:
            applied = await tx.upsert_documents(
                [DocumentRow(doc_id=u.doc_id, body=u.event.change.text, version=u.event.change.version,
                             content_sha256=u.sha, metadata=u.event.change.metadata, source=u.event.envelope.source,
                             vectors={m.version: embedded.vectors[(u.doc_id, m.version)] for m in u.embedded(embedded)},
                             chunks={m.version: embedded.chunks[(u.doc_id, m.version)]
                                     for m in u.embedded(embedded) if m.chunked})
                 for u in upserts if not u.fill_in], models)
            filled: set[tuple[str, int]] = set()  # fill-ins: vectors of documents still at that text
            for model in models:
                filled |= {(doc_id, model.version) for doc_id in await tx.write_vectors(model, [
                    VectorRow(u.doc_id, u.sha, embedded.vectors[(u.doc_id, model.version)],
                              embedded.chunks.get((u.doc_id, model.version)))
                    for u in upserts if u.fill_in and model in u.embedded(embedded)])}
            deleted = await tx.delete_documents(
                [DeleteRow(e.change.doc_id, e.change.version, seen.get(e.change.doc_id), e.envelope.source)
                 for e in deletes])
            changelog: list[ChangelogRow] = []
            outcomes: list[tuple[Envelope, Action]] = []
            written: Counter[str] = Counter()
            for u in upserts:
                if not u.fill_in and u.doc_id not in applied:
                    changelog += [self._row(u.event, v, Action.SUPERSEDED) for v in slots]
                    outcomes.append((u.event.envelope, Action.SUPERSEDED))
                    continue
                done = [m for m in u.embedded(embedded) if not u.fill_in or (u.doc_id, m.version) in filled]
                for v in slots:
                    key = (u.doc_id, v)
                    if v in {m.version for m in done}:
                        changelog.append(self._row(u.event, v, Action.EMBEDDED, tokens=embedded.tokens[key],
                                                   detail=embedded.details.get(key)))
                    elif key in embedded.failed:
                        changelog.append(self._row(u.event, v, Action.FAILED, embedded.failed[key]))
                    elif key in embedded.vectors:  # a fill-in whose document changed since it was read
                        changelog.append(self._row(u.event, v, Action.SUPERSEDED))
                    else:
                        changelog.append(self._row(u.event, v, Action.UNCHANGED))
                outcomes.append((u.event.envelope, Action.EMBEDDED if done else Action.UNCHANGED))
                written.update(m.name for m in done)
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
        await self._dead_letter([
            DeadLetter(u.event.envelope, DeadLetterReason.INPUT_REJECTED, f"model {m.name!r}: {embedded.rejected[key]}",
                       self.origin, m.version, u.event.change.event_id)
            for u in upserts for m in u.needed if (key := (u.doc_id, m.version)) in embedded.rejected])

    @staticmethod
    def _sort_out(winners: Sequence[ChangeEvent], stored: Mapping[str, StoredDocument], models: Sequence[ModelSpec],
                  superseded: list[ChangeEvent]) -> tuple[list[_Upsert], list[ChangeEvent]]:
        """The batch's winners as upserts and deletes; those not newer than what is known join ``superseded``.

        An upsert at the stored version with the stored text is a *fill-in* (a record delivered again, or a
        dead letter replayed): it writes only the vectors the stored document lacks.
        """
        upserts: list[_Upsert] = []
        deletes: list[ChangeEvent] = []
        for event in winners:
            doc = stored[event.change.doc_id]
            version, known = event.change.version, doc.newest_known_version()
            if event.change.is_delete:
                (superseded if version is not None and known is not None and version <= known else deletes).append(event)
                continue
            sha = content_sha256(event.change.text)
            fill_in = version == doc.version and sha == doc.content_sha256
            if known is not None and version <= known and not fill_in:
                superseded.append(event)
                continue
            upserts.append(_Upsert(event, sha, [m for m in models if doc.model_sha256.get(m.version) != sha], fill_in))
        return upserts, deletes

    async def _embed_upserts(self, upserts: Sequence[_Upsert], models: Sequence[ModelSpec]) -> _BatchVectors:
        """Embed each upsert's text with the models it needs, all models at once."""
        todo = {m.version: [u for u in upserts if m in u.needed] for m in models}
        asked = [m for m in models if todo[m.version]]
        results = await asyncio.gather(*(self._embed_available(m, todo[m.version]) for m in asked))
        batch = _BatchVectors()
        for model, result in zip(asked, results):
            used = [] if isinstance(result, BaseException) else result.tokens_used(model)
            for i, upsert in enumerate(todo[model.version]):
                key = (upsert.doc_id, model.version)
                if isinstance(result, BaseException):
                    batch.failed[key] = f"provider_unavailable: {_error_text(result)}"
                elif i in result.rejected:
                    batch.rejected[key] = result.rejected[i]
                    batch.failed[key] = f"input_rejected: {result.rejected[i]}"
                else:
                    batch.vectors[key] = result.vectors[i]
                    batch.tokens[key] = (used[i], result.tokens[i])
                    if isinstance(result, ChunkedEmbedded):
                        batch.chunks[key] = result.chunks[i]
                        batch.details[key] = result.detail(i)
        return batch

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
        retired = {m.name: m for m in await self.store.retired_models()}
        events: list[ReadMissEvent] = []
        invalid: list[DeadLetter] = []
        gone: list[ReadMissEvent] = []
        for envelope in envelopes:
            try:
                miss = decode_read_miss(envelope.value)
            except InvalidEvent as error:
                invalid.append(DeadLetter(envelope, error.reason, str(error), self.origin))
                continue
            if miss.model in retired:
                gone.append(ReadMissEvent(envelope, miss, retired[miss.model]))
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
        await self._retired(gone)
        for model in models.values():
            mine = [e for e in events if e.model.version == model.version]
            if mine:
                await self._isolate(mine, self._apply, self._poison)

    def _row(self, event: ReadMissEvent, action: Action, doc_version: int | None = None, error: str | None = None,
             tokens: tuple[int, int] | None = None, detail: dict | None = None):
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
            detail=detail,
        )

    async def _apply(self, events: Sequence[ReadMissEvent]) -> None:
        try:
            await self._reembed(events)
        except errors.UndefinedColumn:  # the model's column was dropped since the batch came: is it retired?
            if events[0].model.version in {m.version for m in await self.store.live_models()}:
                raise
            await self._retired(events)

    async def _reembed(self, events: Sequence[ReadMissEvent]) -> None:
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
            embedded = await self._embed(model, [d.doc_id for d in docs], [d.body for d in docs],
                                         priority=self.priority)
        except ModelHalted as error:  # until an operator acts: recorded, not retried; the sweeper comes back later
            await self._record_halted(known, stored, error)
            return
        rejected = {docs[i].doc_id: why for i, why in embedded.rejected.items()}
        tokens = dict(zip(todo, zip(embedded.tokens_used(model), embedded.tokens)))
        details = ({d.doc_id: embedded.detail(i) for i, d in enumerate(docs)}
                   if isinstance(embedded, ChunkedEmbedded) else {})
        async with self.store.transaction() as tx:
            written = await tx.write_vectors(model, [
                VectorRow(d.doc_id, d.content_sha256, embedded.vectors[i],
                          embedded.chunks[i] if isinstance(embedded, ChunkedEmbedded) else None)
                for i, d in enumerate(docs) if d.doc_id not in rejected])
            changelog = []
            outcomes: list[tuple[Envelope, Action]] = []
            first_seen: set[str] = set()
            for event in known:
                doc_id = event.miss.doc_id
                error = None
                if doc_id in rejected:
                    action, error = Action.FAILED, f"input_rejected: {rejected[doc_id]}"
                elif doc_id in written and doc_id not in first_seen:
                    action = Action.EMBEDDED
                elif doc_id in todo and doc_id not in written:
                    action = Action.SUPERSEDED
                else:
                    action = Action.UNCHANGED
                first_seen.add(doc_id)
                counted = tokens[doc_id] if action is Action.EMBEDDED else None
                changelog.append(self._row(event, action, stored[doc_id].version, error, tokens=counted,
                                           detail=details.get(doc_id) if counted else None))
                outcomes.append((event.envelope, action))
            await tx.log(changelog)
        self._committed(outcomes, {model.name: len(written)})
        await self._dead_letter([
            DeadLetter(e.envelope, DeadLetterReason.INPUT_REJECTED, f"model {model.name!r}: {rejected[e.miss.doc_id]}",
                       self.origin, model.version, e.miss.event_id)
            for e in known if e.miss.doc_id in rejected])

    async def _retired(self, events: Sequence[ReadMissEvent]) -> None:
        """Asked of a model retired since (a finished or an aborted migration): nothing to do, and nothing wrong."""
        if events:
            async with self.store.transaction() as tx:
                await tx.log([self._row(e, Action.SUPERSEDED) for e in events])
            self._committed([(e.envelope, Action.SUPERSEDED) for e in events], {})

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
