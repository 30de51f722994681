"""``segue import``: adopt a corpus that already lives in a pgvector table, without embedding it again.

The source table is read in keyset pages of its id column, each page taken whole in
binary COPY form from the source's ``COPY (SELECT …) TO STDOUT`` and copied as is into a
staging table here (no row is decoded in Python; the next page is read while this one
is written), then written in one statement with the change pipeline's version rules: a
document already stored at a newer version is not touched. The page's last id is the
watermark, committed with the page, so a killed import resumes after it.

The source is read-only to Segue: every transaction on it is ``BEGIN READ ONLY``, every
query but the page's COPY goes over the extended protocol (one statement each), and
``--text-expression`` is checked to be one expression before any COPY holds it.

With ``--vector-column``, the stored vectors are adopted as model ``--model``'s column:
registered with provider ``adopted`` (dim from the column type, or from the rows of an
untyped ``vector`` column; a fingerprint from the declared source and a hash of a sample
of its vectors). A vector of another width, or all zeros, is not adopted (its document
is). Every row read is written or counted under the reason it was not (no id, no text,
a doc_id too long, a version out of range, a duplicate id, deleted or stored at a newer
version), and reported.

With ``--chunk-column`` and ``--chunk-text-column`` the table's rows are chunks of documents
(the id column is then the document's id): see :func:`segue.storage.chunks.write_import_chunk_page`.
A document's body is its chunks' texts joined by a blank line in chunk order, and its
vectors become the chunk vectors of a chunked adopted model (``config["chunking"]`` is
:data:`~segue.embedding.chunking.ADOPTED_CHUNKS`). Pages never split a document: a page
ends after the last chunk of its last id.

``--follow`` then keeps Segue in step with the table (not a chunk table): a keyset on (version, id) publishes
rows whose version passed the newest one published, and a periodic reconcile pass walks
the whole table to publish what that keyset cannot see (a per-row revision counter, a row
committed late) and the deletes, unless they are too many to be believed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from segue.control import registry
from segue.embedding.chunking import ADOPTED_CHUNKS
from segue.embedding.providers import ADOPTED
from segue.ratelimit import per_second
from segue.schemas.changelog import Action
from segue.schemas.events import (
    MAX_DOC_ID_CHARS,
    MAX_VERSION,
    InvalidEvent,
    decode_change,
    encode_change,
)
from segue.spec import ModelProfile, ModelSpec
from segue.storage import changelog, chunks, documents

log = logging.getLogger("segue.control.importer")

FINGERPRINT_SAMPLE = 64  # stored vectors hashed into an adopted model's fingerprint
TIME_TYPES = {"timestamp with time zone", "timestamp without time zone", "date"}
INTEGER_BITS = {"smallint": 16, "integer": 32, "bigint": 64}
INTEGER_TYPES = set(INTEGER_BITS)
TEXT_TYPES = {"text", "character varying", "character"}
ID_TYPES = INTEGER_TYPES | TEXT_TYPES | {"uuid"}
RELATION_KINDS = {"r", "p", "v", "m", "f"}  # what can be read: tables (partitioned, foreign too), views (materialized)
# A text holding a character that is not Unicode white space (PostgreSQL's [:space:] depends on the locale).
HAS_TEXT = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

# Why a source row is not written (the import reports each; --follow logs them).
NO_ID = "no id"
BAD_DOC_ID = f"doc_id not 1 to {MAX_DOC_ID_CHARS} characters"
NO_TEXT = "no text"
BAD_VERSION = "version below 0, infinite or past 2^63 µs"
DUPLICATE_ID = "another row has the same id (the one at the newest version is imported)"
DELETED_NEWER = "deleted at a newer version"
NO_CHUNK_NO = "no chunk number"
DUPLICATE_CHUNK = ("another row has the same id and chunk number (the one at the newest version, then the first text"
                   " in byte order, is imported)")
ZERO_MEAN = "its chunk vectors average to zero"
FOLLOW_CHUNKS = "--follow does not follow a chunk table: run segue import again to take in its changes"


class ImportRefused(RuntimeError):
    """An import that cannot run as asked (unknown table or column, unusable types, a bad text expression)."""


@dataclass(frozen=True)
class Source:
    """What to read: a table of some database, its id, text, version, metadata and vector columns."""

    url: str
    table: str  # as the user wrote it: name, schema.name, or a quoted name
    id_column: str
    text_columns: tuple[str, ...] = ()
    text_expression: str | None = None
    version_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    vector_column: str | None = None
    chunk_column: str | None = None  # set: the rows are chunks of the documents the id column names
    chunk_text_column: str | None = None

    @property
    def chunked(self) -> bool:
        """Whether the table's rows are chunks (``--chunk-column``) rather than documents."""
        return self.chunk_column is not None

    @property
    def identity(self) -> str:
        """A name for this source that survives restarts: host, database, table, id, chunk and vector columns."""
        parts = urlsplit(self.url)
        where = f"{parts.hostname or 'local'}{parts.path}" if parts.scheme else "local"
        return (f"{where}/{self.table}#{self.id_column}" + (f"[{self.chunk_column}]" if self.chunked else "")
                + (f"@{self.vector_column}" if self.vector_column else ""))


@dataclass(frozen=True)
class Column:
    """A source column: its type's base name (``character``) and full name (``character(8)``), its typmod, and
    whether it is NOT NULL."""

    base: str
    full: str
    typmod: int
    not_null: bool


@dataclass(frozen=True)
class SourceTable:
    """The source table as its database resolved it: oid, schema-qualified name, columns."""

    oid: int
    name: sql.SQL  # quoted (see :func:`_name`)
    columns: dict[str, Column]


@dataclass
class ImportReport:
    """Rows read, written (with and without an adopted vector), skipped, and why."""

    read: int = 0
    written: int = 0
    superseded: int = 0  # the same or a newer version was already stored
    skipped: Counter[str] = field(default_factory=Counter)  # rows not imported, by reason
    vectors_not_adopted: Counter[str] = field(default_factory=Counter)  # documents imported without their vector
    seconds: float = 0.0
    chunks: int | None = None  # of a chunk table: the rows that became chunks of the documents written

    def lines(self) -> list[str]:
        """What the import did, for the user: a line of totals, then one per reason a row or vector was left."""
        rate = self.read / self.seconds if self.seconds else 0.0
        built = "" if self.chunks is None else f" from {self.chunks} chunks"
        lines = [f"read {self.read} rows in {self.seconds:.1f}s ({rate:,.0f} rows/s); wrote {self.written} documents"
                 f"{built}, {self.superseded} already stored at the same or a newer version"]
        lines += [f"skipped {n} row(s): {why}" for why, n in sorted(self.skipped.items()) if n]
        lines += [f"imported {n} document(s) without their vector: {why}" for why, n in
                  sorted(self.vectors_not_adopted.items()) if n]
        return lines


def _connect_source(url: str) -> psycopg.Connection:
    """A connection to the source database on which every transaction begins ``BEGIN READ ONLY``.

    ``default_transaction_read_only`` would not do: a text expression can turn it off with
    ``set_config``; a transaction begun read-only cannot be made to write.
    """
    conn = psycopg.connect(url)
    conn.read_only = True
    return conn


def _fetch(source_conn: psycopg.Connection, query: sql.Composable, params: Sequence[Any]) -> list[tuple]:
    """The rows of one query on the source, in a read-only transaction of its own.

    Binary results make psycopg use the extended protocol, which takes one statement
    only (a query without parameters would go over the simple one, where ``;`` starts
    another). A query holding the text expression always has ``params`` (its ``%`` is doubled).
    """
    with source_conn.transaction():
        return source_conn.execute(query, params, binary=True).fetchall()


def _name(*parts: str) -> sql.SQL:
    """A quoted identifier for a query on the source, its ``%`` doubled: every query there has parameters."""
    return sql.SQL(sql.Identifier(*parts).as_string(None).replace("%", "%%"))


def _literal(value: str) -> sql.SQL:
    """A string literal for a query on the source, its ``%`` doubled likewise."""
    return sql.SQL(sql.Literal(value).as_string(None).replace("%", "%%"))


def _resolve(source_conn: psycopg.Connection, table: str) -> tuple[int, sql.SQL]:
    """(oid, schema-qualified name) of ``table``: as PostgreSQL reads the name, else the exact name as typed."""
    schema, _, name = table.rpartition(".")
    candidates = [table, sql.Identifier(table).as_string(source_conn)]
    if schema:
        candidates.append(sql.Identifier(schema, name).as_string(source_conn))
    for candidate in candidates:
        try:
            found = _fetch(source_conn, "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c"
                                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                                        " WHERE c.oid = to_regclass(%s)", (candidate,))
        except (psycopg.ProgrammingError, psycopg.NotSupportedError):  # not a name PostgreSQL can read
            continue
        if found:
            oid, namespace, relation, kind = found[0]
            if kind not in RELATION_KINDS:
                raise ImportRefused(f"{table} is not a table or a view")
            return oid, _name(namespace, relation)
    raise ImportRefused(f"no table {table!r} in the source database")


def _describe(source_conn: psycopg.Connection, source: Source) -> SourceTable:
    """The source table, resolved and checked: its columns exist and have usable types, the text expression is one."""
    oid, name = _resolve(source_conn, source.table)
    columns = {attname: Column(base, full, typmod, not_null) for attname, base, full, typmod, not_null in _fetch(
        source_conn, "SELECT attname, format_type(atttypid, NULL), format_type(atttypid, atttypmod), atttypmod,"
                     " attnotnull FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,))}
    table = SourceTable(oid, name, columns)
    _check(source, table)
    if source.text_expression:  # planned, not run: a second statement, or a comment cutting the query, fails here
        try:
            _fetch(source_conn, sql.SQL("SELECT * FROM ({}) r LIMIT %s").format(_rows(source, table)), (0,))
        except psycopg.Error as error:
            raise ImportRefused(f"--text-expression must be one SQL expression over the columns of {source.table}"
                                f" (evaluated read-only): {error.diag.message_primary or error}") from None
    return table


def check_options(source: Source) -> None:
    """Refuse, in one line, options that do not go together (before any database is asked)."""
    if bool(source.chunk_column) != bool(source.chunk_text_column):
        raise ImportRefused("--chunk-column and --chunk-text-column go together: the chunk's order in its document"
                            " and its text")
    if source.chunked:
        if source.text_columns or source.text_expression:
            raise ImportRefused("a chunk table's text is its --chunk-text-column: leave out --text-column and"
                                " --text-expression (documents are rebuilt from their chunks)")
    elif bool(source.text_columns) == bool(source.text_expression):
        raise ImportRefused("give the text as --text-column (one or more) or as --text-expression, not both")


def _check(source: Source, table: SourceTable) -> None:
    check_options(source)
    types = {name: column.base for name, column in table.columns.items()}
    named = [source.id_column, *source.text_columns, *source.metadata_columns]
    named += [c for c in (source.version_column, source.vector_column, source.chunk_column,
                          source.chunk_text_column) if c]
    missing = [c for c in named if c not in types]
    if missing:
        raise ImportRefused(f"{source.table} has no column {', '.join(map(repr, missing))}")
    if types[source.id_column] not in ID_TYPES:
        raise ImportRefused(f"--id-column {source.id_column} is {types[source.id_column]}: "
                           "use an integer, text or uuid column")
    if source.chunk_column and types[source.chunk_column] not in INTEGER_TYPES:
        raise ImportRefused(f"--chunk-column {source.chunk_column} is {types[source.chunk_column]}: "
                            "use an integer column (the chunk's order in its document)")
    if source.version_column and types[source.version_column] not in TIME_TYPES | INTEGER_TYPES:
        raise ImportRefused(f"--version-column {source.version_column} is {types[source.version_column]}: "
                           "use an integer or timestamp column")
    if source.vector_column and types[source.vector_column] != "vector":
        raise ImportRefused(f"--vector-column {source.vector_column} is {types[source.vector_column]}, not vector")


def _text(source: Source) -> sql.Composable:
    """The row's text: the expression (its ``%`` doubled: every query holding it has parameters), the columns, or
    the chunk's text."""
    if source.chunked:
        return _name(source.chunk_text_column)
    if source.text_expression:
        return sql.SQL(source.text_expression.replace("%", "%%"))
    if len(source.text_columns) > 1:
        return sql.SQL("concat_ws(E'\\n\\n', {})").format(sql.SQL(", ").join(map(_name, source.text_columns)))
    return _name(source.text_columns[0])


def _version(source: Source, table: SourceTable) -> sql.Composable:
    """The row's version as int8: 0 without one, NULL when the contract cannot carry it (below 0, infinite, too far)."""
    if not source.version_column:
        return sql.SQL("0::int8")
    column = _name(source.version_column)
    value = column
    if table.columns[source.version_column].base in TIME_TYPES:  # microseconds since the epoch: monotone with the time
        value = sql.SQL("(extract(epoch FROM {}) * 1000000)").format(column)
    return sql.SQL("CASE WHEN {column} IS NULL THEN 0::int8 WHEN {value} BETWEEN 0 AND {top} THEN {value}::int8 END"
                   ).format(column=column, value=value, top=sql.Literal(MAX_VERSION))


def _rows(source: Source, table: SourceTable) -> sql.Composed:
    """The source's rows as Segue sees them: key (the id, natively typed, never NULL), doc_id, chunk (of a chunk
    table: its number, else NULL), body (NULL: no text), version (NULL: out of range), metadata, vec."""
    metadata = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(_literal(c), _name(c)) for c in source.metadata_columns))
    vector = _name(source.vector_column) if source.vector_column else sql.SQL("NULL")
    chunk = sql.SQL("{}::int8").format(_name(source.chunk_column)) if source.chunked else sql.SQL("NULL::int8")
    return sql.SQL(
        "SELECT key, doc_id, chunk, CASE WHEN body ~ {has_text} THEN body END AS body, version, metadata, vec FROM"
        " (SELECT {id} AS key, {id}::text AS doc_id, {chunk} AS chunk, ({text})::text AS body, {version} AS version,"
        " {metadata} AS metadata, {vector}::vector AS vec FROM {table} WHERE {id} IS NOT NULL) r"
    ).format(has_text=sql.Literal(HAS_TEXT), id=_name(source.id_column), chunk=chunk, text=_text(source),
             version=_version(source, table), metadata=metadata, vector=vector, table=table.name)


def _unusable(row: str) -> sql.Composed:
    """The WHEN clauses of a CASE naming why ``row`` (doc_id, body, version) makes no document change."""
    doc_id, body, version = (sql.Identifier(row, column) for column in ("doc_id", "body", "version"))
    return sql.SQL("WHEN length({doc_id}) NOT BETWEEN 1 AND {most} THEN {bad_doc_id} WHEN {body} IS NULL THEN {no_text}"
                   " WHEN {version} IS NULL THEN {bad_version}").format(
        doc_id=doc_id, body=body, version=version, most=sql.Literal(MAX_DOC_ID_CHARS),
        bad_doc_id=sql.Literal(BAD_DOC_ID), no_text=sql.Literal(NO_TEXT), bad_version=sql.Literal(BAD_VERSION))


def _after(key: sql.Composable, column: Column) -> sql.Composed:
    """``key`` past a keyset position given twice as text (None: from the start), compared in the id's own type."""
    return sql.SQL("(%s::text IS NULL OR {key} > %s::{key_type})").format(key=key, key_type=sql.SQL(column.full))


def _page_queries(source: Source, table: SourceTable) -> tuple[sql.Composed, sql.Composed]:
    """(the last id of the next page after a watermark, the rows up to it typed as the staging table is).

    Params: (watermark, watermark, page size) and (watermark, watermark, last id); a None
    watermark means from the start. The last id is the one at the page size's row, so a
    page of a chunk table holds every chunk of its last document too (pages never split one).
    """
    column = table.columns[source.id_column]
    id_ = _name(source.id_column)
    last = sql.SQL("SELECT k::text FROM (SELECT {id} AS k FROM {table} WHERE {id} IS NOT NULL AND {after}"
                   " ORDER BY {id} LIMIT %s) p ORDER BY k DESC LIMIT 1").format(id=id_, table=table.name,
                                                                              after=_after(id_, column))
    chunk = sql.SQL("chunk, ") if source.chunked else sql.SQL("")
    order = sql.SQL("key, chunk") if source.chunked else sql.SQL("key")
    rows = sql.SQL("COPY (SELECT doc_id, {chunk}body, version, metadata, vec, row_number() OVER (ORDER BY {order})"
                   " FROM ({rows}) r WHERE {after} AND key <= %s::{key_type} ORDER BY {order}) TO STDOUT (FORMAT BINARY)"
                   ).format(chunk=chunk, order=order, rows=_rows(source, table), key_type=sql.SQL(column.full),
                            after=_after(sql.Identifier("key"), column))
    return last, rows


@dataclass(frozen=True)
class _SourcePage:
    """One page as read from the source: its rows in COPY BINARY form, and its last id (None: no rows left)."""

    data: bytes
    last: str | None


def _read_page(source_conn: psycopg.Connection, queries: tuple[sql.Composed, sql.Composed], watermark: str | None,
               page_size: int) -> _SourcePage:
    """The page after ``watermark``. The COPY goes over the simple protocol (psycopg merges its parameters), which
    is safe because the text expression was checked to be one expression (:func:`_describe`)."""
    last_query, rows_query = queries
    with source_conn.transaction():
        found = source_conn.execute(last_query, (watermark, watermark, page_size), binary=True).fetchone()
        if found is None:
            return _SourcePage(b"", None)
        last = found[0]
        with source_conn.cursor() as cursor, cursor.copy(rows_query, (watermark, watermark, last)) as out:
            return _SourcePage(b"".join(out), last)


def adopt_model(conn: psycopg.Connection, source_conn: psycopg.Connection, source: Source, name: str,
                table: SourceTable) -> ModelSpec:
    """Register (or find, when resuming) model ``name`` for the vectors of ``source.vector_column``."""
    column = _name(source.vector_column)
    dim = table.columns[source.vector_column].typmod
    if dim <= 0:  # an untyped vector column: the width most of its rows have
        widths = _fetch(source_conn, sql.SQL("SELECT vector_dims({c}) FROM {t} WHERE {c} IS NOT NULL"
                                             " GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT %s").format(
            c=column, t=table.name), (1,))
        if not widths:
            raise ImportRefused(f"{source.table}.{source.vector_column} holds no vector to adopt")
        dim = widths[0][0]
    chunk = _name(source.chunk_column) if source.chunked else sql.SQL("NULL::int8")
    sample = _fetch(source_conn, sql.SQL(  # the first rows by id (an index scan), of which those of the model's width
        "SELECT k::text, v::text FROM (SELECT {id} AS k, {chunk} AS n, {c} AS v FROM {t} WHERE {c} IS NOT NULL"
        " ORDER BY {id}, {chunk} LIMIT %s) s WHERE vector_dims(v) = %s ORDER BY k, n LIMIT %s").format(
        id=_name(source.id_column), chunk=chunk, c=column, t=table.name),
        (16 * FINGERPRINT_SAMPLE, dim, FINGERPRINT_SAMPLE))
    config: dict[str, Any] = {"source": source.identity, "sampled_vectors": len(sample)}
    if source.chunked:  # a chunked model: register_model creates its chunk table
        config["chunking"] = ADOPTED_CHUNKS
    digest = hashlib.sha256(json.dumps({"provider": ADOPTED, "source": source.identity, "dim": dim,
                                        "sample": sample}, sort_keys=True).encode()).hexdigest()
    profile = ModelProfile(provider=ADOPTED, dim=dim, max_tokens=0, config=config, fingerprint=digest)
    try:
        existing = registry.get_model(conn, name).spec
    except registry.RegistryError:
        return registry.register_model(conn, name, source.identity, profile=profile)
    if source.identity not in (existing.config.get("source"), existing.config.get("adopted_from")):
        raise ImportRefused(f"model {name!r} is already registered for something else ({existing.source})")
    if existing.chunked != source.chunked:
        raise ImportRefused(f"model {name!r} holds {'chunk' if existing.chunked else 'document'} vectors;"
                            f" {source.table} holds {'chunks' if source.chunked else 'documents'}")
    if existing.dim != dim:
        raise ImportRefused(f"model {name!r} is {existing.dim}-d; {source.table}.{source.vector_column} is {dim}-d")
    return existing


def run_import(conn: psycopg.Connection, source: Source, *, model: str | None, page_size: int,
               rate: float | None, console: Console | None) -> ImportReport:
    """Import ``source`` into ``conn``'s documents (adopting its vectors as ``model``), resuming after its
    watermark; returns what was read, written and skipped.

    Of a chunk table (``source.chunked``) each document is rebuilt from its chunks and the
    vectors are adopted as the chunk vectors of ``model``, a chunked model.
    """
    if bool(model) != bool(source.vector_column):
        raise ImportRefused("--vector-column and --model go together: the model whose vectors the column holds")
    check_options(source)
    report = ImportReport(chunks=0 if source.chunked else None)
    started = time.perf_counter()
    with _connect_source(source.url) as source_conn:
        table = _describe(source_conn, source)
        if _fetch(source_conn, "SELECT row_security_active(%s)", (table.oid,))[0][0]:
            log.warning("row-level security is active on %s for this role: only the rows it shows are imported",
                        source.table)
        spec = adopt_model(conn, source_conn, source, model, table) if model else None
        newest = sql.SQL("SELECT max({}) FROM {}").format(_version(source, table), table.name)
        watermark = _watermark(conn, source.identity, lambda: _fetch(source_conn, newest, ())[0][0])
        documents.stage_imports_in_memory(conn)
        if not table.columns[source.id_column].not_null:
            (no_id,) = _fetch(source_conn, sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
                table.name, _name(source.id_column)), ())[0]
            report.read += no_id
            if no_id:
                report.skipped[NO_ID] = no_id
        (estimate,) = _fetch(source_conn, "SELECT greatest(reltuples::bigint, 0) FROM pg_class WHERE oid = %s",
                             (table.oid,))[0]
        queries = _page_queries(source, table)
        pace = per_second(rate, burst=page_size) if rate else None
        progress = Progress(TextColumn(f"import {escape(source.table)}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]:,.0f} rows/s"), TimeRemainingColumn(),
                            console=console, disable=console is None)
        with progress, ThreadPoolExecutor(1, thread_name_prefix="segue-import-read") as reader:
            task = progress.add_task("import", total=estimate or None, rate=0.0)
            ahead = reader.submit(_read_page, source_conn, queries, watermark, page_size)
            while (page := ahead.result()).last is not None:
                # The source reads the next page while this one is written here.
                ahead = reader.submit(_read_page, source_conn, queries, page.last, page_size)
                if pace is not None:
                    pace.try_acquire("import", weight=page_size)
                _page(conn, source, spec, page, report)
                progress.update(task, completed=report.read,
                                rate=report.read / max(time.perf_counter() - started, 1e-9))
        report.seconds = time.perf_counter() - started
        with conn.transaction():
            conn.execute("UPDATE import_progress SET finished_at = now(), updated_at = now() WHERE source = %s",
                         (source.identity,))
            changelog.log_control(conn, Action.IMPORTED, model_version=spec.version if spec else None,
                                  detail={"source": source.identity, "read": report.read, "written": report.written,
                                          "superseded": report.superseded, "skipped": report.skipped,
                                          "vectors_not_adopted": report.vectors_not_adopted})
    return report


def _watermark(conn: psycopg.Connection, identity: str, newest_version: Callable[[], int | None]) -> str | None:
    """Where the import of ``identity`` stopped (None: from the start; a finished import starts over).

    An import from the start also marks where ``--follow`` begins, unless it has begun: at the
    newest version the table held before the import read it, so no change made since is missed
    (``newest_version`` scans the source, so it is called only then).
    """
    with conn.transaction():
        row = conn.execute("SELECT watermark, finished_at FROM import_progress WHERE source = %s FOR UPDATE",
                           (identity,)).fetchone()
        if row is None or row[1] is not None:
            conn.execute("INSERT INTO import_progress AS p (source, follow_version) VALUES (%s, %s)"
                         " ON CONFLICT (source) DO UPDATE SET watermark = NULL, rows_read = 0, started_at = now(),"
                         " updated_at = now(), finished_at = NULL,"
                         " follow_version = coalesce(p.follow_version, excluded.follow_version)",
                         (identity, newest_version()))
            return None
        return row[0]


def _page(conn: psycopg.Connection, source: Source, spec: ModelSpec | None, page: _SourcePage,
          report: ImportReport) -> None:
    """Write one page (:func:`segue.storage.documents.write_import_page`) and its watermark in one transaction;
    counts it in ``report``.

    A row is written unless it is unusable, loses to another row of its id, or its document
    was deleted at a newer version; deleted at its own version, it is written again: the
    source is the truth, and this undoes a delete published by ``--follow``.
    """
    with conn.transaction():
        if source.chunked:
            _chunk_page(conn, source, spec, page, report)
            return
        outcomes = documents.write_import_page(conn, page.data, label=f"import:{source.identity}", adopt=spec,
                                               unusable=_unusable("s"), duplicate=DUPLICATE_ID,
                                               deleted_newer=DELETED_NEWER)
        for skipped_because, vector_missed_because, rows, written in outcomes:
            report.read += rows
            if skipped_because is not None:
                report.skipped[skipped_because] += rows
                continue
            report.written += written
            report.superseded += rows - written
            if vector_missed_because is not None:
                report.vectors_not_adopted[vector_missed_because] += written
        conn.execute("UPDATE import_progress SET watermark = %s, rows_read = rows_read + %s, updated_at = now()"
                     " WHERE source = %s", (page.last, sum(rows for _, _, rows, _ in outcomes), source.identity))


def _chunk_page(conn: psycopg.Connection, source: Source, spec: ModelSpec | None, page: _SourcePage,
                report: ImportReport) -> None:
    """Write one page of a chunk table (:func:`segue.storage.chunks.write_import_chunk_page`) and its watermark, in
    the caller's transaction; counts it in ``report`` (rows read and skipped, documents written and superseded)."""
    reasons = chunks.ImportReasons(bad_doc_id=BAD_DOC_ID, no_chunk_no=NO_CHUNK_NO, no_text=NO_TEXT,
                                   bad_version=BAD_VERSION, duplicate=DUPLICATE_CHUNK, deleted_newer=DELETED_NEWER,
                                   zero_mean=ZERO_MEAN)
    outcomes = chunks.write_import_chunk_page(conn, page.data, label=f"import:{source.identity}",
                                              adopt=(spec.version, spec.dim) if spec else None, reasons=reasons,
                                              max_doc_id_chars=MAX_DOC_ID_CHARS)
    for outcome in outcomes:
        report.read += outcome.rows
        if outcome.skipped is not None:
            report.skipped[outcome.skipped] += outcome.rows
            continue
        report.written += outcome.documents_written
        report.superseded += outcome.documents - outcome.documents_written
        report.chunks += outcome.rows_written
        if outcome.vector_missed is not None:
            report.vectors_not_adopted[outcome.vector_missed] += outcome.documents_written
    conn.execute("UPDATE import_progress SET watermark = %s, rows_read = rows_read + %s, updated_at = now()"
                 " WHERE source = %s", (page.last, sum(o.rows for o in outcomes), source.identity))


Record = tuple[str, bytes | None]  # a document-changes record: (doc_id, value); a None value is a tombstone


async def follow(conn: psycopg.Connection, source: Source, producer, topic: str, *, poll_s: float,
                 reconcile_every_s: float, max_delete_fraction: float, max_text_bytes: int, page_size: int) -> None:
    """Keep Segue in step with ``source`` for users who cannot publish events yet, until cancelled.

    Every ``poll_s``, rows whose (version, id) passed the last one published are published as
    document changes (workers embed them with every model Segue runs). Every
    ``reconcile_every_s`` a reconcile pass (:func:`_reconcile`) walks the whole table, a page
    between polls: it publishes rows that Segue lacks or holds at an older version, which the
    keyset misses when versions count per row or a row commits late, and the deletes of
    stored documents the table no longer has, unless they are more than ``max_delete_fraction``
    of its documents. A row that makes no valid change (see :func:`_changes`) is logged, not sent.
    """
    if source.chunked:
        raise ImportRefused(FOLLOW_CHUNKS)
    if not source.version_column:
        raise ImportRefused("--follow needs --version-column: it publishes the rows whose version moved")
    with _connect_source(source.url) as source_conn:
        table = _describe(source_conn, source)
        changed = sql.SQL(  # keyset on (version, id): a bulk update gives many rows one version
            "SELECT doc_id, body, version, metadata, CASE {unusable} END FROM ({rows}) r WHERE version IS NOT NULL"
            " AND (version, key) > (%s, %s::{key_type}) ORDER BY version, key LIMIT %s").format(
            unusable=_unusable("r"), rows=_rows(source, table),
            key_type=sql.SQL(table.columns[source.id_column].full))
        row = conn.execute("SELECT follow_version, follow_key FROM import_progress WHERE source = %s",
                           (source.identity,)).fetchone()
        if row is None:
            raise ImportRefused(f"{source.table} was never imported: run segue import before --follow")
        since, after = (row[0], row[1]) if row[0] is not None else (-1, None)
        reconciling: Iterator[list[Record]] | None = None
        next_poll = next_reconcile = time.monotonic()
        while True:
            if time.monotonic() >= next_poll:
                rows = _fetch(source_conn, changed, (since, after, page_size))
                if rows:
                    records, skipped = _changes(rows, max_text_bytes)
                    await _publish(producer, topic, records)
                    after, since = rows[-1][0], rows[-1][2]
                    conn.execute("UPDATE import_progress SET follow_version = %s, follow_key = %s, updated_at = now()"
                                 " WHERE source = %s", (since, after, source.identity))
                    log.info("published %d changed rows of %s (up to version %d)", len(records), source.table, since)
                    _log_skipped(source, skipped)
                next_poll = time.monotonic() + (0 if len(rows) == page_size else poll_s)
            if reconciling is None and time.monotonic() >= next_reconcile:
                reconciling = _reconcile(conn, source_conn, source, table, page_size=page_size,
                                         max_delete_fraction=max_delete_fraction, max_text_bytes=max_text_bytes)
            if reconciling is not None:
                step = next(reconciling, None)
                if step is None:
                    reconciling, next_reconcile = None, time.monotonic() + reconcile_every_s
                else:
                    await _publish(producer, topic, step)
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(max(0.0, min(next_poll, next_reconcile) - time.monotonic()))


async def _publish(producer, topic: str, records: list[Record]) -> None:
    """Send ``records`` keyed by doc_id, in order, and wait until the broker has them all."""
    deliveries = [await producer.send(topic, key=doc_id.encode(), value=value) for doc_id, value in records]
    await asyncio.gather(*deliveries)


def _changes(rows: list[tuple], max_text_bytes: int) -> tuple[list[Record], Counter[str]]:
    """The document changes of source rows (doc_id, body, version, metadata, why unusable), checked as a worker will
    check them; and the rows that make none, counted by reason."""
    records, skipped = [], Counter()
    for doc_id, body, version, metadata, unusable in rows:
        if unusable is not None:
            skipped[unusable] += 1
            continue
        value = encode_change(doc_id, version=version, text=body, metadata=metadata)
        try:
            decode_change(doc_id.encode(), value, max_text_bytes=max_text_bytes)
        except InvalidEvent as error:  # a worker would dead-letter it
            skipped[error.reason.value] += 1
            continue
        records.append((doc_id, value))
    return records, skipped


def _log_skipped(source: Source, skipped: Counter[str]) -> None:
    for why, n in sorted(skipped.items()):
        log.warning("skipped %d row(s) of %s: %s", n, source.table, why)


def _reconcile(conn: psycopg.Connection, source_conn: psycopg.Connection, source: Source, table: SourceTable, *,
               page_size: int, max_delete_fraction: float, max_text_bytes: int) -> Iterator[list[Record]]:
    """One reconcile pass: a generator of the records to publish, a step per page read.

    First the table in keyset pages of its id: each row's version is compared with what
    Segue holds (documents.version, document_tombstones.version), and the rows it lacks or
    holds older, and has not deleted at a newer version, are published. Then the stored
    documents whose ids could be the table's, in pages: those the table no longer has are
    deleted, unless row-level security may hide rows from this role, or they are more than
    ``max_delete_fraction`` of them, as the walk saw them or as one last look in one
    snapshot, just before publishing, sees them.
    """
    column = table.columns[source.id_column]
    rows = _rows(source, table)
    versions = sql.SQL("SELECT doc_id, version FROM ({rows}) r WHERE {after} ORDER BY key LIMIT %s").format(
        rows=rows, after=_after(sql.Identifier("key"), column))
    wanted = sql.SQL("SELECT doc_id, body, version, metadata, CASE {unusable} END FROM ({rows}) r"
                     " WHERE key = ANY(%s::{key_type}[])").format(unusable=_unusable("r"), rows=rows,
                                                                  key_type=sql.SQL(column.full))
    published, skipped, deleted_at_their_version, after = 0, Counter(), 0, None
    while page := _fetch(source_conn, versions, (after, after, page_size)):
        after = page[-1][0]
        compared = documents.behind(conn, page)
        deleted_at_their_version += sum(1 for _, deleted in compared if deleted)
        candidates = [doc_id for doc_id, deleted in compared if not deleted]
        records, page_skipped = _changes(_fetch(source_conn, wanted, (candidates,)) if candidates else [],
                                         max_text_bytes)
        published += len(records)
        skipped += page_skipped
        yield records
    gone, known = [], 0
    present = sql.SQL("SELECT {id}::text FROM {table} WHERE {id} = ANY(%s::{key_type}[])").format(
        id=_name(source.id_column), table=table.name, key_type=sql.SQL(column.full))

    def absent(doc_ids: list[str]) -> list[str]:
        found = {doc_id for (doc_id,) in _fetch(source_conn, present, (doc_ids,))} if doc_ids else set()
        return [doc_id for doc_id in doc_ids if doc_id not in found]

    stored_after = ""
    while stored := documents.doc_ids_after(conn, stored_after, page_size):
        stored_after = stored[-1]
        theirs = [doc_id for doc_id in stored if _could_be_id(doc_id, column)]
        known += len(theirs)
        gone += absent(theirs)
        yield []
    log.info("reconciled %s: published %d row(s) Segue lacked or held at an older version; %d of the %d documents"
             " it holds are gone from the table", source.table, published, len(gone), known)
    _log_skipped(source, skipped)
    if deleted_at_their_version:
        log.warning("%d row(s) of %s were deleted from Segue at the version the table still holds: run segue import"
                    " to restore them", deleted_at_their_version, source.table)
    if not gone:
        return
    if _fetch(source_conn, "SELECT row_security_active(%s)", (table.oid,))[0][0]:
        log.error("not publishing the %d deletes of %s: row-level security is active on it for this role, and may"
                  " hide rows; follow it with a role that sees every row (its owner, or one with BYPASSRLS)",
                  len(gone), source.table)
        return
    if _too_many(source, len(gone), known, max_delete_fraction):
        return
    # Once more, in one statement (one snapshot): rows back since are not deleted, and a table emptied since the
    # walk saw it (a reload under way) has fewer rows than the documents the walk found in it.
    (rows, gone), = _fetch(source_conn, sql.SQL(
        "SELECT (SELECT count(*) FROM {table} WHERE {id} IS NOT NULL), array(SELECT g FROM unnest(%s::text[]) g"
        " WHERE NOT EXISTS (SELECT FROM {table} WHERE {id} = g::{key_type}))").format(
        table=table.name, id=_name(source.id_column), key_type=sql.SQL(column.full)), (gone,))
    if _too_many(source, len(gone) + max(0, known - len(gone) - rows), known, max_delete_fraction):
        return
    if gone:
        log.info("publishing %d delete(s) of rows gone from %s", len(gone), source.table)
        yield [(doc_id, None) for doc_id in gone]


def _too_many(source: Source, gone: int, known: int, max_delete_fraction: float) -> bool:
    """Whether ``gone`` of the ``known`` documents of the table are too many to delete (then it says so).

    One delete a pass is always allowed, so a small table's rows can be deleted one at a time.
    """
    if gone <= max(1.0, max_delete_fraction * known):
        return False
    log.error("not publishing the deletes of %s: %d of the %d documents of it that Segue holds (%.1f%%) are gone"
              " from it, more than --max-delete-fraction %g. Check that the table shows every row (row-level"
              " security, a replica behind, a reload under way); if the rows were deleted, follow with"
              " --max-delete-fraction %.2f", source.table, gone, known, 100 * gone / known, max_delete_fraction,
              min(1.0, gone / known + 0.005))
    return True


def _could_be_id(doc_id: str, column: Column) -> bool:
    """Whether ``doc_id`` is the text form of a value of the id column's type (a stored document that is not
    could not be the table's: someone else published it)."""
    if column.base in INTEGER_TYPES:
        bound = 2 ** (INTEGER_BITS[column.base] - 1)
        return re.fullmatch(r"0|-?[1-9][0-9]{0,18}", doc_id) is not None and -bound <= int(doc_id) < bound
    if column.base == "uuid":
        try:
            return str(uuid.UUID(doc_id)) == doc_id
        except ValueError:
            return False
    if column.typmod > 0:  # (var)char(n): n characters at most, and the text of a char(n) has no trailing space
        return len(doc_id) <= column.typmod - 4 and not (column.base == "character" and doc_id.endswith(" "))
    return True
