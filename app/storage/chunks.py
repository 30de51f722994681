"""A chunked model's chunk table: every statement on it.

A chunked model version N (see :mod:`segue.embedding.chunking`) owns ``chunks_vN``:
one row per chunk of each document, with its character offsets in the body, its token
count, the hash of the text embedded and its vector. Its rows of a document are
replaced in the transaction that writes the document's ``embedding_vN_sha256`` (and its
``embedding_vN``, the normalised mean of the chunks), under the same compare-and-set, so
the chunks of a document are current exactly when that hash is its content's; rows of a
deleted document go with it (``ON DELETE CASCADE``). Coverage, staleness, read misses,
backfill and progress therefore stay per document, on ``documents``.

Rows are replaced by position: a chunk whose offsets, hash and vector are unchanged is
not written again, so an edit touches only the chunks it changed (and the HNSW graph
only for their vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from segue.storage import connections
from segue.storage.model_columns import chunk_table, sha_column

CHUNK_COLUMNS = (("doc_id", "text"), ("chunk_no", "int4"), ("start_char", "int4"), ("end_char", "int4"),
                 ("tokens", "int4"), ("chunk_sha256", "bytea"), ("embedding", "vector"))


@dataclass(frozen=True)
class ChunkRow:
    """One chunk of a document as stored: its place, its offsets in the body, its hash and vector."""

    chunk_no: int
    start: int
    end: int
    tokens: int
    sha256: bytes
    vector: np.ndarray


def create(conn: psycopg.Connection, version: int, dim: int) -> None:
    """Create model ``version``'s chunk table (DDL: run through :func:`segue.storage.upgrades.run_ddl`)."""
    conn.execute(sql.SQL(
        "CREATE TABLE {t} (doc_id text NOT NULL REFERENCES documents (doc_id) ON DELETE CASCADE,"
        " chunk_no integer NOT NULL CHECK (chunk_no >= 0), start_char integer NOT NULL, end_char integer NOT NULL,"
        " tokens integer NOT NULL, chunk_sha256 bytea NOT NULL, embedding vector({dim}) NOT NULL,"
        " PRIMARY KEY (doc_id, chunk_no), CHECK (0 <= start_char AND start_char <= end_char))"
    ).format(t=chunk_table(version), dim=sql.Literal(dim)))


async def known_vectors(conn: psycopg.AsyncConnection, version: int,
                        wanted: Sequence[tuple[str, bytes]]) -> dict[tuple[str, bytes], np.ndarray]:
    """The stored vectors of the ``(doc_id, chunk hash)`` pairs model ``version`` has embedded already."""
    if not wanted:
        return {}
    async with conn.cursor(binary=True) as cur:
        await cur.execute(sql.SQL(
            "SELECT DISTINCT ON (c.doc_id, c.chunk_sha256) c.doc_id, c.chunk_sha256, c.embedding"
            " FROM {t} c JOIN unnest(%s::text[], %s::bytea[]) AS w (doc_id, sha)"
            " ON c.doc_id = w.doc_id AND c.chunk_sha256 = w.sha"
        ).format(t=chunk_table(version)), ([d for d, _ in wanted], [s for _, s in wanted]))
        return {(doc_id, sha): np.asarray(vector.to_numpy() if hasattr(vector, "to_numpy") else vector,
                                          dtype=np.float32)
                for doc_id, sha, vector in await cur.fetchall()}


async def replace(conn: psycopg.AsyncConnection, version: int, dim: int,
                  documents: Sequence[tuple[str, Sequence[ChunkRow]]]) -> None:
    """Make ``documents``' chunks of model ``version`` exactly these (call in the transaction that wrote their
    hash on ``documents``); unchanged rows are left as they are."""
    if not documents:
        return
    stage = f"segue_chunks_v{version}"
    await conn.execute(sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {s} (doc_id text, chunk_no int4, start_char int4, end_char int4,"
        " tokens int4, chunk_sha256 bytea, embedding vector({dim})) ON COMMIT DELETE ROWS"
    ).format(s=sql.Identifier(stage), dim=sql.Literal(dim)))
    ordered = sorted(documents, key=lambda document: document[0])
    await connections.copy_binary(conn, stage, CHUNK_COLUMNS, (
        (doc_id, c.chunk_no, c.start, c.end, c.tokens, c.sha256, c.vector) for doc_id, rows in ordered for c in rows))
    t, s = chunk_table(version), sql.Identifier(stage)
    await conn.execute(sql.SQL(
        "DELETE FROM {t} c USING unnest(%s::text[]) AS d (doc_id) WHERE c.doc_id = d.doc_id"
        " AND NOT EXISTS (SELECT 1 FROM {s} s WHERE s.doc_id = c.doc_id AND s.chunk_no = c.chunk_no)"
    ).format(t=t, s=s), ([doc_id for doc_id, _ in ordered],))
    await conn.execute(sql.SQL(
        "INSERT INTO {t} AS c SELECT * FROM {s} ORDER BY doc_id, chunk_no ON CONFLICT (doc_id, chunk_no)"
        " DO UPDATE SET start_char = excluded.start_char, end_char = excluded.end_char, tokens = excluded.tokens,"
        " chunk_sha256 = excluded.chunk_sha256, embedding = excluded.embedding"
        " WHERE (c.start_char, c.end_char, c.chunk_sha256) IS DISTINCT FROM"
        " (excluded.start_char, excluded.end_char, excluded.chunk_sha256)"
    ).format(t=t, s=s))


def nearest(conn: psycopg.Connection, version: int, query: np.ndarray, k: int, *, filters: dict | None = None,
            lacking_version: int | None = None, exact: bool = False) -> list[tuple]:
    """(doc_id, body, metadata, cosine distance, (chunk_no, start_char, end_char)) of the ``k`` documents whose
    best current chunk of model ``version`` is nearest to ``query`` (max-sim), nearest first, ties by doc_id.

    ``filters`` and ``lacking_version`` as in :func:`segue.storage.documents.nearest`. With
    an HNSW index the nearest chunks are read in index order (pgvector's iterative scan
    past filtered rows) until ``k`` documents are found; ``exact`` scans the table.
    """
    where = [sql.SQL("d.{} = d.content_sha256").format(sha_column(version))]
    params: dict[str, Any] = {"query": query}
    if lacking_version is not None:
        where.append(sql.SQL("d.{} IS DISTINCT FROM d.content_sha256").format(sha_column(lacking_version)))
    if filters:
        where.append(sql.SQL("d.metadata @> %(filters)s::jsonb"))
        params["filters"] = Jsonb(filters)
    statement = sql.SQL(
        "WITH hits AS MATERIALIZED (SELECT c.doc_id, c.chunk_no, c.start_char, c.end_char,"
        "  c.embedding <=> %(query)s AS distance FROM {t} c JOIN documents d ON d.doc_id = c.doc_id"
        "  WHERE {where} ORDER BY distance LIMIT %(depth)s),"
        " best AS (SELECT DISTINCT ON (doc_id) * FROM hits ORDER BY doc_id, distance, chunk_no)"
        " SELECT b.doc_id, d.body, d.metadata, b.distance, b.chunk_no, b.start_char, b.end_char,"
        "  (SELECT count(*) FROM hits) FROM best b JOIN documents d ON d.doc_id = b.doc_id"
        " ORDER BY b.distance, b.doc_id LIMIT %(k)s"
    ).format(t=chunk_table(version), where=sql.SQL(" AND ").join(where))
    depth = max(4 * k, 40)
    with conn.transaction():
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        else:
            conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        while True:
            rows = conn.execute(statement, params | {"k": k, "depth": depth}).fetchall()
            if len(rows) >= k or not rows or rows[0][7] < depth:  # k documents, or every current chunk seen
                break
            depth *= 4
    return [(doc_id, body, metadata, distance, (chunk_no, start, end))
            for doc_id, body, metadata, distance, chunk_no, start, end, _ in rows]


def best_distances(conn: psycopg.Connection, version: int, query: np.ndarray,
                   doc_ids: Sequence[str]) -> dict[str, float]:
    """Each of ``doc_ids``' best chunk's cosine distance to ``query`` on model ``version``, for the documents whose
    chunks are current (the others are left out)."""
    rows = conn.execute(sql.SQL(
        "SELECT c.doc_id, min(c.embedding <=> %s) FROM {t} c JOIN documents d ON d.doc_id = c.doc_id"
        " WHERE c.doc_id = ANY(%s) AND d.{h} = d.content_sha256 GROUP BY c.doc_id"
    ).format(t=chunk_table(version), h=sha_column(version)), (query, list(doc_ids))).fetchall()
    return dict(rows)



@dataclass(frozen=True)
class ImportReasons:
    """The words an import of a chunk table reports a row (or a document's vector) under, by what went wrong."""

    bad_doc_id: str
    no_chunk_no: str
    no_text: str
    bad_version: str
    duplicate: str
    deleted_newer: str
    zero_mean: str


@dataclass(frozen=True)
class ChunkImportOutcome:
    """What one group of a page's rows came to: why skipped (None: usable), why their documents' vector was not
    adopted (None: it was, or none was asked), rows, rows in written documents, documents, documents written."""

    skipped: str | None
    vector_missed: str | None
    rows: int
    rows_written: int
    documents: int
    documents_written: int


def write_import_chunk_page(conn: psycopg.Connection, page: bytes, *, label: str, adopt: tuple[int, int] | None,
                            reasons: ImportReasons, max_doc_id_chars: int) -> list[ChunkImportOutcome]:
    """Stage one page of a chunk table and write its documents (and, with ``adopt``, their chunks), in the caller's
    transaction.

    ``page`` holds rows (doc_id, chunk, text, version, metadata, vec, ord) in binary COPY
    form, holding every row of each of its doc_ids. A row is skipped (and counted under
    its reason) for a doc_id not 1 to ``max_doc_id_chars`` characters, no chunk number, no text, a version
    out of range, another row of its (doc_id, chunk) that wins (the newest version, then
    the first text in byte order), or a document deleted at a newer version than its rows'
    newest. The rest of a document's rows, by chunk number, make its body (their texts
    joined by a blank line) at the highest of their versions, with the first one's metadata,
    written under :func:`segue.storage.documents.upsert_newer`'s rule like any import.

    ``adopt`` is (version, dim) of a chunked adopted model: a document whose every chunk has
    a vector of ``dim`` that is not all zeros gets the normalised mean of them as its vector
    (tied to its content hash) and, when written, exactly those chunks in ``chunks_vN``:
    ``chunk_no`` the rank of the chunk in the document from 0, ``start_char``/``end_char``
    its place in the body in characters (code points), ``tokens`` 0 (the tokenizer that
    cut them is unknown), ``chunk_sha256`` the sha256 of its UTF-8 text. Any other document
    is written without the vector (the reason of its first chunk that lacks one is reported),
    and its stored chunks are left as they are: stale with its stored hash.
    """
    from segue.storage.documents import upsert_newer  # documents imports this module

    conn.execute("SET LOCAL work_mem = '256MB'")
    conn.execute("SET LOCAL synchronous_commit = off")  # a page lost in a crash is lost with its watermark: redone
    conn.execute("CREATE TEMP TABLE segue_import_chunks (doc_id text, chunk int8, body text, version int8,"
                 " metadata jsonb, vec vector, ord int8) ON COMMIT DROP")
    with conn.cursor() as cursor, cursor.copy("COPY segue_import_chunks FROM STDIN (FORMAT BINARY)") as into:
        into.write(page)
    vector_missed = sql.SQL("NULL::text")
    if adopt is not None:
        vector_missed = sql.SQL(
            "CASE WHEN s.vec IS NULL THEN 'no vector' WHEN vector_dims(s.vec) <> {dim} THEN {mismatch}"
            " WHEN vector_norm(s.vec) = 0 THEN 'all-zero vector' END").format(
            dim=sql.Literal(adopt[1]), mismatch=sql.Literal(f"dimension mismatch (not {adopt[1]})"))
    conn.execute(sql.SQL(  # each row: why skipped, why its vector cannot be adopted, its rank and start in the body
        "CREATE TEMP TABLE segue_import_placed ON COMMIT DROP AS"
        " WITH checked AS (SELECT s.ord, s.doc_id, s.chunk, s.version, char_length(s.body) AS chars, CASE"
        "   WHEN length(s.doc_id) NOT BETWEEN 1 AND {most} THEN {bad_doc_id} WHEN s.chunk IS NULL THEN {no_chunk_no}"
        "   WHEN s.body IS NULL THEN {no_text} WHEN s.version IS NULL THEN {bad_version}"
        "   WHEN row_number() OVER (PARTITION BY s.doc_id, s.chunk ORDER BY s.body IS NULL, s.version IS NULL,"
        "    s.version DESC, s.body COLLATE \"C\", s.ord) > 1 THEN {duplicate} END AS skipped,"
        "   {vector_missed} AS vector_missed FROM segue_import_chunks s),"
        " dated AS (SELECT c.*, CASE WHEN c.skipped IS NULL AND max(c.version) FILTER (WHERE c.skipped IS NULL)"
        "   OVER (PARTITION BY c.doc_id) < t.version THEN {deleted_newer} ELSE c.skipped END AS why"
        "   FROM checked c LEFT JOIN document_tombstones t ON t.doc_id = c.doc_id)"
        " SELECT d.ord, d.doc_id, d.why AS skipped, d.vector_missed, d.chars,"
        "  CASE WHEN d.why IS NULL THEN row_number() OVER w - 1 END AS chunk_no,"
        "  CASE WHEN d.why IS NULL THEN coalesce(sum(d.chars + 2) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING"
        "   AND 1 PRECEDING), 0) END AS start_char"
        " FROM dated d WINDOW w AS (PARTITION BY d.doc_id, d.why IS NULL ORDER BY d.chunk)"
    ).format(most=sql.Literal(max_doc_id_chars), bad_doc_id=sql.Literal(reasons.bad_doc_id),
             no_chunk_no=sql.Literal(reasons.no_chunk_no), no_text=sql.Literal(reasons.no_text),
             bad_version=sql.Literal(reasons.bad_version), duplicate=sql.Literal(reasons.duplicate),
             vector_missed=vector_missed, deleted_newer=sql.Literal(reasons.deleted_newer)))
    conn.execute("CREATE TEMP TABLE segue_import_written (doc_id text, vector_missed text) ON COMMIT DROP")
    values = [sql.SQL("j.doc_id, j.body, j.version, j.content, j.metadata, {label}, 0, j.ord").format(
        label=sql.Literal(label))]
    if adopt is not None:
        values.append(sql.SQL("CASE WHEN j.vector_missed IS NULL THEN l2_normalize(j.mean)::vector({dim}) END,"
                              " CASE WHEN j.vector_missed IS NULL THEN j.content END").format(dim=sql.Literal(adopt[1])))
    write = upsert_newer(sql.SQL("SELECT {values} FROM judged j ORDER BY j.doc_id").format(
        values=sql.SQL(", ").join(values)), [adopt[0]] if adopt else [], adopting=adopt[0] if adopt else None)
    conn.execute(sql.SQL(
        "WITH docs AS (SELECT p.doc_id, string_agg(s.body, E'\\n\\n' ORDER BY p.chunk_no) AS body,"
        "   max(s.version) AS version, (array_agg(s.metadata ORDER BY p.chunk_no))[1] AS metadata, min(s.ord) AS ord,"
        "   (array_agg(p.vector_missed ORDER BY p.chunk_no) FILTER (WHERE p.vector_missed IS NOT NULL))[1]"
        "    AS vector_missed, avg(CASE WHEN p.vector_missed IS NULL THEN s.vec END) AS mean"
        "   FROM segue_import_placed p JOIN segue_import_chunks s USING (ord) WHERE p.skipped IS NULL"
        "   GROUP BY p.doc_id),"
        " judged AS MATERIALIZED (SELECT doc_id, body, version, sha256(convert_to(body, 'UTF8')) AS content,"
        "   metadata, ord, coalesce(vector_missed, CASE WHEN vector_norm(mean) = 0 THEN {zero_mean} END)"
        "   AS vector_missed, mean FROM docs),"
        " written AS ({write}),"
        " restored AS (DELETE FROM document_tombstones t USING written w WHERE t.doc_id = w.doc_id)"
        " INSERT INTO segue_import_written SELECT w.doc_id, j.vector_missed FROM written w JOIN judged j USING (doc_id)"
    ).format(zero_mean=sql.Literal(reasons.zero_mean) if adopt else sql.SQL("NULL"), write=write))
    if adopt is not None:
        version, dim = adopt
        conn.execute(sql.SQL("DELETE FROM {t} WHERE doc_id = ANY(array(SELECT doc_id FROM segue_import_written"
                             " WHERE vector_missed IS NULL))").format(t=chunk_table(version)))
        conn.execute(sql.SQL(
            "INSERT INTO {t} (doc_id, chunk_no, start_char, end_char, tokens, chunk_sha256, embedding)"
            " SELECT p.doc_id, p.chunk_no, p.start_char, p.start_char + p.chars, 0,"
            "  sha256(convert_to(s.body, 'UTF8')), s.vec::vector({dim})"
            " FROM segue_import_written w JOIN segue_import_placed p ON p.doc_id = w.doc_id AND p.skipped IS NULL"
            " JOIN segue_import_chunks s USING (ord) WHERE w.vector_missed IS NULL ORDER BY p.doc_id, p.chunk_no"
        ).format(t=chunk_table(version), dim=sql.Literal(dim)))
    return [ChunkImportOutcome(*row) for row in conn.execute(
        "SELECT p.skipped, w.vector_missed, count(*), count(w.doc_id),"
        " count(DISTINCT p.doc_id) FILTER (WHERE p.skipped IS NULL), count(DISTINCT w.doc_id)"
        " FROM segue_import_placed p LEFT JOIN segue_import_written w ON p.skipped IS NULL AND w.doc_id = p.doc_id"
        " GROUP BY 1, 2").fetchall()]
