"""``documents`` and ``document_tombstones``: every statement on them, and the worker's batched writes.

Every write path stages its rows with a binary COPY into a temporary table and then
applies them with one set-based statement guarded by a compare-and-set (on the
document version for changes and imports, on the content hash for re-embeds), so
replays after a crash are harmless. The version rule is written once,
:func:`upsert_newer`, for the change pipeline and the import alike. The worker groups
the writes of one batch (changelog rows included) in :meth:`Store.transaction`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from segue import metrics
from segue.embedding import providers
from segue.schemas.events import SourcePosition
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import changelog, chunks, connections, registry
from segue.storage.chunks import ChunkRow
from segue.storage.model_columns import sha_column, vector_column

DOCUMENT_COLUMNS = ("doc_id", "body", "version", "content_sha256", "metadata", "source_topic", "source_partition",
                    "source_offset")


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
    chunks: dict[int, Sequence[ChunkRow]] = field(default_factory=dict)  # a chunked model's chunks, by version


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
    chunks: Sequence[ChunkRow] | None = None  # a chunked model's chunks (the vector is their mean)


def upsert_newer(rows: sql.Composable, versions: Sequence[int], *, adopting: int | None = None) -> sql.Composed:
    """The one write rule of ``documents``: insert ``rows``, or replace a stored document only with a newer version.

    ``rows`` is a SELECT of :data:`DOCUMENT_COLUMNS` and then, per model of ``versions``,
    its vector and hash, in doc_id order (writers lock rows in one order). A model whose
    hash a row leaves NULL keeps its stored vector and hash. ``adopting`` (a model version)
    also lets a row at the stored version with the stored content write that model's
    vector where it is missing (an import adopting the vectors of documents it wrote).
    The statement returns the doc_ids written.
    """
    columns = [sql.Identifier(name) for name in DOCUMENT_COLUMNS]
    replace = [sql.SQL("{c} = excluded.{c}").format(c=c) for c in columns[1:]] + [sql.SQL("updated_at = now()")]
    for version in versions:
        v, h = vector_column(version), sha_column(version)
        columns += [v, h]
        replace.append(sql.SQL("{v} = CASE WHEN excluded.{h} IS NULL THEN d.{v} ELSE excluded.{v} END,"
                               " {h} = coalesce(excluded.{h}, d.{h})").format(v=v, h=h))
    newer = sql.SQL("d.version < excluded.version")
    if adopting is not None:
        newer = sql.SQL("({newer} OR (d.version = excluded.version AND d.content_sha256 = excluded.content_sha256"
                        " AND d.{h} IS NULL AND excluded.{h} IS NOT NULL))").format(newer=newer, h=sha_column(adopting))
    return sql.SQL(
        "INSERT INTO documents AS d ({columns}) {rows} ON CONFLICT (doc_id) DO UPDATE SET {replace}"
        " WHERE {newer} RETURNING d.doc_id"
    ).format(columns=sql.SQL(", ").join(columns), rows=rows, replace=sql.SQL(", ").join(replace), newer=newer)


class StoreTransaction:
    """The writes of one batch, committed together."""

    def __init__(self, conn: psycopg.AsyncConnection):
        self._conn = conn

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
        columns = list(zip(DOCUMENT_COLUMNS, ("text", "text", "int8", "bytea", "jsonb", "text", "int4", "int8")))
        for m in models:
            columns += [(f"embedding_v{m.version}", "vector"), (f"embedding_v{m.version}_sha256", "bytea")]

        def staged(row: DocumentRow) -> list[Any]:
            values: list[Any] = [row.doc_id, row.body, row.version, row.content_sha256, Jsonb(row.metadata),
                                 row.source.topic, row.source.partition, row.source.offset]
            for m in models:
                embedded = m.version in row.vectors
                values += [row.vectors[m.version] if embedded else None, row.content_sha256 if embedded else None]
            return values

        await connections.copy_binary(self._conn, stage, columns,
                                      (staged(r) for r in sorted(rows, key=lambda r: r.doc_id)))
        newer_than_deleted = sql.SQL(
            "SELECT {staged} FROM {stage} s LEFT JOIN document_tombstones t ON t.doc_id = s.doc_id"
            " WHERE t.version IS NULL OR s.version > t.version ORDER BY s.doc_id"
        ).format(staged=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(name)) for name, _ in columns),
                 stage=sql.Identifier(stage))
        async with self._conn.cursor() as cur:
            await cur.execute(upsert_newer(newer_than_deleted, [m.version for m in models]))
            applied = {row[0] for row in await cur.fetchall()}
        await self._conn.execute(sql.SQL(
            "DELETE FROM document_tombstones t USING {} s WHERE t.doc_id = s.doc_id AND t.version < s.version"
        ).format(sql.Identifier(stage)))
        for m in models:
            if m.chunked:
                await chunks.replace(self._conn, m.version, m.dim, [
                    (r.doc_id, r.chunks[m.version]) for r in rows if r.doc_id in applied and m.version in r.chunks])
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
        await connections.copy_binary(
            self._conn,
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
                ).format(v=vector_column(model.version), h=sha_column(model.version), stage=sql.Identifier(stage))
            )
            written = {row[0] for row in await cur.fetchall()}
        if model.chunked:
            await chunks.replace(self._conn, model.version, model.dim,
                                 [(r.doc_id, r.chunks) for r in rows if r.doc_id in written])
        return written

    async def log(self, rows: Sequence[changelog.ChangelogRow]) -> None:
        """Append changelog rows (the activity counters follow by trigger)."""
        await changelog.append(self._conn, rows)


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
        return await registry.specs_async(await self.connection(), "live")

    async def retired_models(self) -> list[ModelSpec]:
        """The models no longer written (a finished migration's old model, an aborted one's new model)."""
        return await registry.specs_async(await self.connection(), "retired")

    async def computed_models(self) -> list[ModelSpec]:
        """The live models whose vectors Segue computes: all but those holding adopted vectors."""
        return [m for m in await self.live_models() if providers.embeds(m)]

    async def known_chunk_vectors(self, version: int,
                                  wanted: Sequence[tuple[str, bytes]]) -> dict[tuple[str, bytes], np.ndarray]:
        """The vectors chunked model ``version`` has already of the ``(doc_id, chunk hash)`` pairs ``wanted``."""
        return await chunks.known_vectors(await self.connection(), version, wanted)

    async def fetch(
        self, doc_ids: Sequence[str], models: Sequence[ModelSpec], *, with_body: bool = False
    ) -> dict[str, StoredDocument]:
        """The stored state of ``doc_ids`` (absent ids come back with version None)."""
        conn = await self.connection()
        hashes = [sql.SQL("d.{}").format(sha_column(m.version)) for m in models]
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


def stage_imports_in_memory(conn: psycopg.Connection) -> None:
    """Give this session room to hold a staged import page in memory (only possible before its first temporary
    table)."""
    if conn.execute("SELECT pg_my_temp_schema() = 0").fetchone()[0]:
        conn.execute("SET temp_buffers = '256MB'")


def write_import_page(conn: psycopg.Connection, page: bytes, *, label: str, adopt: ModelSpec | None,
                      unusable: sql.Composable, duplicate: str, deleted_newer: str) -> list[tuple]:
    """Stage one page of an import and write it with :func:`upsert_newer`, in the caller's transaction.

    ``page`` holds rows (doc_id, body, version, metadata, vec, ord) in binary COPY form; each
    is written as a document of ``label`` (its source topic) at offset ``ord``, unless it is
    skipped: by ``unusable`` (the caller's CASE branches over the staged row ``s``, each naming
    its reason), as ``duplicate`` when another row of its id wins, or as ``deleted_newer`` when
    its document was deleted at a newer version. Deleted at its own version, it is written
    again and its tombstone goes: the source is the truth. With ``adopt``, a vector of that
    model's width that is not all zeros becomes the document's vector for it.

    Returns (why skipped, why its vector was not adopted, rows, documents written) per group of rows.
    """
    conn.execute("SET LOCAL work_mem = '256MB'")  # the page is sorted by doc_id in memory, not on disk
    conn.execute("CREATE TEMP TABLE segue_import (doc_id text, body text, version int8, metadata jsonb,"
                 " vec vector, ord int8) ON COMMIT DROP")
    with conn.cursor() as cursor, cursor.copy("COPY segue_import FROM STDIN (FORMAT BINARY)") as into:
        into.write(page)
    skipped = sql.SQL(
        "CASE {unusable} WHEN row_number() OVER (PARTITION BY s.doc_id ORDER BY s.body IS NULL, s.version IS NULL,"
        " s.version DESC, s.ord DESC) > 1 THEN {duplicate} WHEN s.version < t.version THEN {deleted} END"
    ).format(unusable=unusable, duplicate=sql.Literal(duplicate), deleted=sql.Literal(deleted_newer))
    content = sql.SQL("sha256(convert_to(s.body, 'UTF8'))")
    values = [sql.SQL("s.doc_id, s.body, s.version, {content}, s.metadata, {label}, 0, s.ord").format(
        content=content, label=sql.Literal(label))]
    vector_missed = sql.SQL("NULL::text")
    if adopt is not None:
        dim = sql.Literal(adopt.dim)
        vector_missed = sql.SQL(
            "CASE WHEN s.vec IS NULL THEN 'no vector' WHEN vector_dims(s.vec) <> {dim}"
            " THEN {mismatch} WHEN vector_norm(s.vec) = 0 THEN 'all-zero vector' END").format(
            dim=dim, mismatch=sql.Literal(f"dimension mismatch (not {adopt.dim})"))
        good = sql.SQL("vector_dims(s.vec) = {dim} AND vector_norm(s.vec) > 0").format(dim=dim)
        values.append(sql.SQL("CASE WHEN {good} THEN s.vec::vector({dim}) END, CASE WHEN {good} THEN {content} END")
                      .format(good=good, dim=dim, content=content))
    write = upsert_newer(sql.SQL("SELECT {values} FROM segue_import s JOIN classified c USING (ord)"
                                 " WHERE c.skipped IS NULL ORDER BY s.doc_id").format(values=sql.SQL(", ").join(values)),
                         [adopt.version] if adopt else [], adopting=adopt.version if adopt else None)
    return conn.execute(sql.SQL(  # what each row (c, by its ord) comes to, kept narrow: no text, no vector
        "WITH classified AS MATERIALIZED (SELECT s.ord, s.doc_id, {skipped} AS skipped,"
        "   {vector_missed} AS vector_missed FROM segue_import s LEFT JOIN document_tombstones t"
        "   ON t.doc_id = s.doc_id),"
        " written AS ({write}),"
        " restored AS (DELETE FROM document_tombstones t USING written w WHERE t.doc_id = w.doc_id)"
        " SELECT c.skipped, CASE WHEN w.doc_id IS NOT NULL THEN c.vector_missed END, count(*), count(w.doc_id)"
        " FROM classified c LEFT JOIN written w ON c.skipped IS NULL AND w.doc_id = c.doc_id GROUP BY 1, 2"
    ).format(skipped=skipped, vector_missed=vector_missed, write=write)).fetchall()


def behind(conn: psycopg.Connection, versions: Sequence[tuple[str, int | None]]) -> list[tuple[str, bool]]:
    """Of (doc_id, version) pairs a source holds, those Segue lacks or holds at an older version and has not
    deleted at a newer one (a None version always), each with whether it was deleted at that very version."""
    return conn.execute(
        "SELECT s.doc_id, s.version = t.version AND d.doc_id IS NULL FROM unnest(%s::text[], %s::int8[])"
        " AS s (doc_id, version) LEFT JOIN documents d ON d.doc_id = s.doc_id"
        " LEFT JOIN document_tombstones t ON t.doc_id = s.doc_id WHERE s.version IS NULL"
        " OR (s.version > coalesce(d.version, -1) AND s.version > coalesce(t.version, -1))"
        " OR (s.version = t.version AND d.doc_id IS NULL)",
        ([doc_id for doc_id, _ in versions], [version for _, version in versions])).fetchall()


def doc_ids_after(conn: psycopg.Connection, after: str, limit: int) -> list[str]:
    """The next ``limit`` stored doc_ids after ``after``, in order."""
    return [doc_id for (doc_id,) in conn.execute("SELECT doc_id FROM documents WHERE doc_id > %s ORDER BY doc_id"
                                                 " LIMIT %s", (after, limit)).fetchall()]


def existing(conn: psycopg.Connection, doc_ids: Iterable[str]) -> set[str]:
    """Those of ``doc_ids`` that are stored."""
    rows = conn.execute("SELECT doc_id FROM documents WHERE doc_id = ANY(%s)", (sorted(doc_ids),)).fetchall()
    return {doc_id for (doc_id,) in rows}


def lacking(conn: psycopg.Connection, version: int, after: str | None, limit: int, *,
            with_body: bool) -> list[tuple[str, str | None]]:
    """The next ``limit`` (doc_id, body) after ``after`` without a current vector of model ``version`` (bodies
    only ``with_body``)."""
    return conn.execute(
        sql.SQL(
            "SELECT doc_id, {} FROM documents WHERE doc_id > %s AND {} IS DISTINCT FROM content_sha256"
            " ORDER BY doc_id LIMIT %s"
        ).format(sql.SQL("body" if with_body else "NULL"), sha_column(version)),
        (after or "", limit),
    ).fetchall()


async def lost_reembeds(cur: psycopg.AsyncCursor, version: int, *, after: str | None, scan: int, max_age_s: float,
                        quiet_s: float) -> tuple[int, str | None, list[str]]:
    """The sweeper's look at the ``scan`` documents after ``after``: (documents scanned, the last one's doc_id,
    those whose vector of model ``version`` should be current and has been stale or missing over ``max_age_s``).

    Should be current: the model serves reads, or the document was written while the model
    was live, or it is behind the model's backfill watermark. A document whose re-embed
    failed within ``quiet_s`` is left out.
    """
    await cur.execute(
        sql.SQL(
            "WITH page AS (SELECT doc_id, updated_at, {h} IS DISTINCT FROM content_sha256 AS lacking"
            "  FROM documents WHERE doc_id > %(after)s ORDER BY doc_id LIMIT %(scan)s)"
            " SELECT (SELECT count(*) FROM page), (SELECT max(doc_id) FROM page),"
            " array(SELECT p.doc_id FROM page p"
            "  JOIN embedding_models m ON m.version = %(v)s"
            "  LEFT JOIN serving s ON true"
            "  LEFT JOIN backfill_progress b ON b.model_version = %(v)s"
            "  WHERE p.lacking AND p.updated_at < now() - make_interval(secs => %(age)s)"
            "  AND (s.read_model_version = m.version OR p.updated_at >= m.created_at"
            "       OR p.doc_id <= b.watermark OR b.finished_at IS NOT NULL)"
            "  AND NOT EXISTS (SELECT 1 FROM migration_changelog c WHERE c.doc_id = p.doc_id"
            "       AND c.action IN ('failed', 'dead_lettered') AND c.model_version = %(v)s"
            "       AND c.at > now() - make_interval(secs => %(quiet)s))"
            "  ORDER BY p.doc_id)"
        ).format(h=sha_column(version)),
        {"after": after or "", "scan": scan, "v": version, "age": max_age_s, "quiet": quiet_s},
    )
    return await cur.fetchone()


def current_sample(conn: psycopg.Connection, version: int, limit: int) -> list[tuple[str, Any]]:
    """(body, vector) of the first ``limit`` documents by doc_id whose vector of model ``version`` is current."""
    return conn.execute(
        sql.SQL("SELECT body, {v} FROM documents WHERE {h} = content_sha256 ORDER BY doc_id LIMIT %s").format(
            v=vector_column(version), h=sha_column(version)), (limit,)).fetchall()


def sample_bodies(conn: psycopg.Connection, size: int) -> list[str]:
    """Up to ``size`` stored bodies: a random sample of pages, or the first rows when that finds too few."""
    rows = conn.execute("SELECT body FROM documents TABLESAMPLE SYSTEM (10) LIMIT %s", (size,)).fetchall()
    if len(rows) < size:
        rows = conn.execute("SELECT body FROM documents LIMIT %s", (size,)).fetchall()
    return [body for (body,) in rows]


def heap_stats(conn: psycopg.Connection) -> tuple[int, float | None]:
    """(the documents heap's bytes, its rows' summed mean column widths from ``pg_stats``: None before ANALYZE)."""
    return conn.execute(
        "SELECT pg_relation_size('documents'), (SELECT sum(s.avg_width * (1 - s.null_frac)) FROM pg_stats s"
        " WHERE s.schemaname = current_schema() AND s.tablename = 'documents')"
    ).fetchone()


def nearest(conn: psycopg.Connection, version: int, query: np.ndarray, k: int, *, filters: dict | None = None,
            lacking_version: int | None = None, exact: bool = False,
            also: tuple[int, np.ndarray] | None = None) -> list[tuple]:
    """(doc_id, body, metadata, cosine distance) of the ``k`` documents whose current vectors of model
    ``version`` are nearest to ``query``, nearest first, ties by doc_id.

    ``filters`` keeps documents whose metadata contains it; ``lacking_version`` keeps documents
    without a current vector of that model. ``exact`` scans the column instead of using an
    HNSW index. ``also`` = (another model version, a query in its space) adds a fifth field:
    each document's distance to that query on that model's column, None where that vector is
    not current.
    """
    where = [sql.SQL("{} = content_sha256").format(sha_column(version))]
    params: dict[str, Any] = {"query": query, "k": k}
    other = sql.SQL("")
    if also is not None:
        other = sql.SQL(", CASE WHEN {h} = content_sha256 THEN {v} <=> %(other)s END").format(
            h=sha_column(also[0]), v=vector_column(also[0]))
        params["other"] = also[1]
    if lacking_version is not None:
        where.append(sql.SQL("{} IS DISTINCT FROM content_sha256").format(sha_column(lacking_version)))
    if filters:
        where.append(sql.SQL("metadata @> %(filters)s::jsonb"))
        params["filters"] = Jsonb(filters)
    statement = sql.SQL(
        "SELECT doc_id, body, metadata, {column} <=> %(query)s AS distance{other} FROM documents"
        " WHERE {where} ORDER BY distance LIMIT %(k)s"
    ).format(column=vector_column(version), other=other, where=sql.SQL(" AND ").join(where))
    with conn.transaction():
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        rows = conn.execute(statement, params).fetchall()
    rows.sort(key=lambda row: (row[3], row[0]))  # deterministic among equal distances
    return rows


def distances(conn: psycopg.Connection, version: int, query: np.ndarray, doc_ids: Sequence[str]) -> dict[str, float]:
    """Each of ``doc_ids``' cosine distance to ``query`` on model ``version``'s column, for the documents whose
    vector of it is current (the others are left out)."""
    statement = sql.SQL("SELECT doc_id, {v} <=> %s FROM documents WHERE doc_id = ANY(%s) AND {h} = content_sha256")
    rows = conn.execute(statement.format(v=vector_column(version), h=sha_column(version)),
                        (query, list(doc_ids))).fetchall()
    return dict(rows)


def insert_embedded(conn: psycopg.Connection, documents: Sequence[tuple[str, str]],
                    vectors: Mapping[int, np.ndarray]) -> None:
    """Insert (doc_id, body) ``documents`` at version 1 with a current vector of each model version in ``vectors``
    (row n for document n), in one transaction."""
    columns = [sql.Identifier(name) for name in ("doc_id", "body", "version", "content_sha256")]
    for version in vectors:
        columns += [vector_column(version), sha_column(version)]
    statement = sql.SQL("INSERT INTO documents ({}) VALUES ({})").format(
        sql.SQL(", ").join(columns), sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    rows = []
    for n, (doc_id, body) in enumerate(documents):
        sha = hashlib.sha256(body.encode()).digest()
        rows.append([doc_id, body, 1, sha, *[v for matrix in vectors.values() for v in (matrix[n], sha)]])
    with conn.cursor() as cur, conn.transaction():
        cur.executemany(statement, rows)
