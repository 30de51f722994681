"""The document store: batched, idempotent writes of documents, vectors and changelog rows.

Every write path stages its rows with a binary COPY into a temporary table (one per
column set, created once per connection and emptied at each commit) and then
applies them with one set-based statement guarded by a compare-and-set (on the
document version for changes, on the content hash for re-embeds), so replays after a
crash are harmless. Callers group the writes of one batch in :meth:`Store.transaction`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segue import metrics
from segue.embedding import providers
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import MAX_DOC_ID_CHARS, SourcePosition
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import connections, model_columns

MAX_CHANGELOG_TEXT_CHARS = 4000


@dataclass(frozen=True)
class StoredDocument:
    """What the store holds for a document id (``version`` is None when there is no row)."""

    doc_id: str
    version: int | None
    content_sha256: bytes | None
    model_sha256: dict[int, bytes | None]
    tombstone_version: int | None
    body: str | None = None

    def newest_known_version(self) -> int | None:
        """The higher of the stored and the deleted-at version."""
        known = [v for v in (self.version, self.tombstone_version) if v is not None]
        return max(known) if known else None


@dataclass(frozen=True)
class DocumentRow:
    """A document to upsert; ``vectors`` holds only the models that were (re)embedded."""

    doc_id: str
    body: str
    version: int
    content_sha256: bytes
    metadata: dict[str, Any]
    source: SourcePosition
    vectors: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DeleteRow:
    """A delete: ``version`` None (a Kafka tombstone) deletes whatever is stored before it.

    A tombstone has no version, so its place in the partition orders it: it deletes the
    stored row unless a later record of the same partition wrote that row (a replay after
    a crash must not delete what came after it). ``seen`` is the highest version the batch
    carried for the document: the tombstone recorded is the highest of it, the deleted
    row's version and any earlier tombstone, so no superseded upsert can come back later.
    """

    doc_id: str
    version: int | None
    seen: int | None
    source: SourcePosition


@dataclass(frozen=True)
class VectorRow:
    """A re-embedded vector, valid only while the document still has ``content_sha256``."""

    doc_id: str
    content_sha256: bytes
    vector: np.ndarray


@dataclass(frozen=True)
class ChangelogRow:
    """One (event, model) outcome."""

    doc_id: str | None
    model_version: int | None
    action: Action
    origin: Origin
    doc_version: int | None = None
    event_id: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    tokens_used: int | None = None  # an embedded row: the tokens the model was given (what an API bills)
    tokens_total: int | None = None  # and the text's tokens before truncation (more: it was truncated)

    def storable(self) -> list[Any]:
        """The row's values as ``migration_changelog`` can always hold them.

        Texts lose NUL characters and are cut (a doc_id to 512 characters, so it fits the
        btree index whatever a bad key held): recording an outcome must never fail on data.
        """
        return [_text(self.doc_id, MAX_DOC_ID_CHARS), self.model_version, self.action.value, self.origin.value,
                self.doc_version, _text(self.event_id, MAX_DOC_ID_CHARS), self.latency_ms,
                _text(self.error, MAX_CHANGELOG_TEXT_CHARS), self.tokens_used, self.tokens_total]


def _text(value: str | None, limit: int) -> str | None:
    return None if value is None else value.replace("\x00", "")[:limit]


_CHANGELOG_COLUMNS = [
    ("doc_id", "text"),
    ("model_version", "int4"),
    ("action", "text"),
    ("origin", "text"),
    ("doc_version", "int8"),
    ("event_id", "text"),
    ("latency_ms", "float8"),
    ("error", "text"),
    ("tokens_used", "int4"),
    ("tokens_total", "int4"),
]


class StoreTransaction:
    """The writes of one batch, committed together."""

    def __init__(self, conn: psycopg.AsyncConnection):
        self._conn = conn

    async def _copy(self, table: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> None:
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)
        )
        async with self._conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types([type_name for _, type_name in columns])
            for row in rows:
                await copy.write_row(row)

    async def upsert_documents(self, rows: Sequence[DocumentRow], models: Sequence[ModelSpec]) -> set[str]:
        """Write bodies, hashes and vectors; return the doc ids whose version was newer.

        A model absent from a row's ``vectors`` keeps the stored vector and hash.
        """
        if not rows:
            return set()
        stage = "segue_stage_" + "_".join(f"v{m.version}" for m in models)
        await self._conn.execute(sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE documents INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        ).format(sql.Identifier(stage)))
        columns = [("doc_id", "text"), ("body", "text"), ("version", "int8"), ("content_sha256", "bytea"),
                   ("metadata", "jsonb"), ("source_topic", "text"), ("source_partition", "int4"),
                   ("source_offset", "int8")]
        for m in models:
            columns += [(f"embedding_v{m.version}", "vector"), (f"embedding_v{m.version}_sha256", "bytea")]

        def staged(row: DocumentRow) -> list[Any]:
            values: list[Any] = [row.doc_id, row.body, row.version, row.content_sha256, Jsonb(row.metadata),
                                 row.source.topic, row.source.partition, row.source.offset]
            for m in models:
                embedded = m.version in row.vectors
                values += [row.vectors[m.version] if embedded else None, row.content_sha256 if embedded else None]
            return values

        await self._copy(stage, columns, (staged(r) for r in sorted(rows, key=lambda r: r.doc_id)))
        names = [sql.Identifier(name) for name, _ in columns]
        keep_unless_embedded = [
            sql.SQL("{v} = CASE WHEN excluded.{h} IS NULL THEN d.{v} ELSE excluded.{v} END,"
                    " {h} = coalesce(excluded.{h}, d.{h})").format(
                v=model_columns.vector_column(m.version), h=model_columns.sha_column(m.version))
            for m in models
        ]
        statement = sql.SQL(
            "INSERT INTO documents AS d ({names}) SELECT {staged} FROM {stage} s"
            " LEFT JOIN document_tombstones t ON t.doc_id = s.doc_id"
            " WHERE t.version IS NULL OR s.version > t.version ORDER BY s.doc_id"
            " ON CONFLICT (doc_id) DO UPDATE SET body = excluded.body, version = excluded.version,"
            " content_sha256 = excluded.content_sha256, metadata = excluded.metadata, updated_at = now(),"
            " source_topic = excluded.source_topic, source_partition = excluded.source_partition,"
            " source_offset = excluded.source_offset"
            "{keep} WHERE d.version < excluded.version RETURNING d.doc_id"
        ).format(
            names=sql.SQL(", ").join(names),
            staged=sql.SQL(", ").join(sql.SQL("s.{}").format(n) for n in names),
            keep=sql.SQL("").join(sql.SQL(", ") + k for k in keep_unless_embedded),
            stage=sql.Identifier(stage),
        )
        async with self._conn.cursor() as cur:
            await cur.execute(statement)
            applied = {row[0] for row in await cur.fetchall()}
        await self._conn.execute(sql.SQL(
            "DELETE FROM document_tombstones t USING {} s WHERE t.doc_id = s.doc_id AND t.version < s.version"
        ).format(sql.Identifier(stage)))
        return applied

    async def delete_documents(self, deletes: Sequence[DeleteRow]) -> dict[str, int]:
        """Delete documents older than the given versions (None = whatever is stored).

        Records a tombstone at the highest version known for the document (see
        :class:`DeleteRow`) so late, older upserts are superseded. Returns {doc_id: deleted
        version} for the rows actually removed.
        """
        if not deletes:
            return {}
        async with self._conn.cursor() as cur:
            await cur.execute(
                "DELETE FROM documents d"
                " USING unnest(%s::text[], %s::bigint[], %s::text[], %s::int[], %s::bigint[])"
                "   AS r(doc_id, version, topic, part, pos)"
                " WHERE d.doc_id = r.doc_id AND CASE WHEN r.version IS NOT NULL THEN d.version < r.version"
                "   ELSE NOT coalesce(d.source_topic = r.topic AND d.source_partition = r.part"
                "                     AND d.source_offset > r.pos, false) END"
                " RETURNING d.doc_id, d.version",
                ([d.doc_id for d in deletes], [d.version for d in deletes], [d.source.topic for d in deletes],
                 [d.source.partition for d in deletes], [d.source.offset for d in deletes]),
            )
            deleted = dict(await cur.fetchall())
            kept = [d.doc_id for d in deletes if d.doc_id not in deleted]
            await cur.execute("SELECT doc_id FROM documents WHERE doc_id = ANY(%s)", (kept,))
            newer = {doc_id for (doc_id,) in await cur.fetchall()}  # stored rows the delete must not touch
        tombstones = sorted(
            (d.doc_id, max(known))
            for d in deletes
            if d.doc_id not in newer
            and (known := [v for v in (d.version, d.seen, deleted.get(d.doc_id)) if v is not None])
        )
        if tombstones:
            await self._conn.execute(
                "INSERT INTO document_tombstones AS t (doc_id, version)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[])"
                " ON CONFLICT (doc_id) DO UPDATE SET version = greatest(t.version, excluded.version),"
                " deleted_at = now()",
                ([d for d, _ in tombstones], [v for _, v in tombstones]),
            )
        return deleted

    async def write_vectors(self, model: ModelSpec, rows: Sequence[VectorRow]) -> set[str]:
        """Store re-embedded vectors of one model where the content is still the embedded one.

        Returns the doc ids written; the others changed (or vanished) meanwhile.
        """
        if not rows:
            return set()
        stage = f"segue_vectors_v{model.version}"
        await self._conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (doc_id text, content_sha256 bytea, embedding vector({}))"
                " ON COMMIT DELETE ROWS"
            ).format(sql.Identifier(stage), sql.Literal(model.dim))
        )
        await self._copy(
            stage,
            [("doc_id", "text"), ("content_sha256", "bytea"), ("embedding", "vector")],
            ((r.doc_id, r.content_sha256, r.vector) for r in rows),
        )
        async with self._conn.cursor() as cur:
            await cur.execute(
                sql.SQL("SELECT d.doc_id FROM documents d JOIN {} s USING (doc_id) ORDER BY d.doc_id FOR UPDATE OF d")
                .format(sql.Identifier(stage))
            )
            await cur.execute(
                sql.SQL(
                    "UPDATE documents d SET {v} = s.embedding, {h} = s.content_sha256 FROM {stage} s"
                    " WHERE d.doc_id = s.doc_id AND d.content_sha256 = s.content_sha256 RETURNING d.doc_id"
                ).format(v=model_columns.vector_column(model.version), h=model_columns.sha_column(model.version), stage=sql.Identifier(stage))
            )
            return {row[0] for row in await cur.fetchall()}

    async def log(self, rows: Sequence[ChangelogRow]) -> None:
        """Append changelog rows (the activity counters follow by trigger)."""
        if rows:
            await self._copy("migration_changelog", _CHANGELOG_COLUMNS, (r.storable() for r in rows))


class Store:
    """An async connection to Segue's tables that reconnects after a connection loss."""

    def __init__(self, settings: Settings, url: str):
        self._settings = settings
        self._url = url
        self._conn: psycopg.AsyncConnection | None = None

    async def connection(self) -> psycopg.AsyncConnection:
        """The open connection (autocommit), reopened after a connection loss."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await connections.connect_async(self._settings, self._url)
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        """A transaction whose writes commit together or not at all (timed to its commit)."""
        conn = await self.connection()
        started = time.perf_counter()
        async with conn.transaction():
            yield StoreTransaction(conn)
        metrics.DB_TRANSACTION_SECONDS.observe(time.perf_counter() - started)

    async def live_models(self) -> list[ModelSpec]:
        """The models every change is embedded with, oldest first."""
        conn = await self.connection()
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT version, name, provider, source, dim, max_tokens, config, fingerprint"
                " FROM embedding_models WHERE state = 'live' ORDER BY version"
            )
            return [ModelSpec(**row) for row in await cur.fetchall()]

    async def computed_models(self) -> list[ModelSpec]:
        """The live models whose vectors Segue computes: all but those holding adopted vectors."""
        return [m for m in await self.live_models() if providers.embeds(m)]

    async def fetch(
        self, doc_ids: Sequence[str], models: Sequence[ModelSpec], *, with_body: bool = False
    ) -> dict[str, StoredDocument]:
        """The stored state of ``doc_ids`` (absent ids come back with version None)."""
        conn = await self.connection()
        hashes = [sql.SQL("d.{}").format(model_columns.sha_column(m.version)) for m in models]
        statement = sql.SQL(
            "SELECT q.doc_id, d.version, d.content_sha256, t.version, {body}{hashes}"
            " FROM unnest(%s::text[]) AS q(doc_id)"
            " LEFT JOIN documents d ON d.doc_id = q.doc_id"
            " LEFT JOIN document_tombstones t ON t.doc_id = q.doc_id"
        ).format(
            body=sql.SQL("d.body") if with_body else sql.SQL("NULL"),
            hashes=sql.SQL("").join(sql.SQL(", ") + h for h in hashes),
        )
        async with conn.cursor() as cur:
            await cur.execute(statement, (list(doc_ids),))
            result = {}
            for doc_id, version, content, tombstone, body, *model_hashes in await cur.fetchall():
                result[doc_id] = StoredDocument(
                    doc_id=doc_id,
                    version=version,
                    content_sha256=content,
                    model_sha256={m.version: h for m, h in zip(models, model_hashes)},
                    tombstone_version=tombstone,
                    body=body,
                )
            return result

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()
