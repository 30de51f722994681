"""``segue import``: adopt a corpus that already lives in a pgvector table, without embedding it again.

The source table is read in keyset pages of its id column, each page taken whole in
binary COPY form from the source's ``COPY (SELECT …) TO STDOUT`` and copied as is into a
staging table here (no row is decoded in Python; the next page is read while this one
is written), then written in one statement with the change pipeline's version rules: a
document already stored at a newer version is not touched. The page's last id is the
watermark, committed with the page, so a killed import resumes after it.

With ``--vector-column``, the stored vectors are adopted as model ``--model``'s column:
registered with provider ``adopted`` (dim from the column type, or from the rows of an
untyped ``vector`` column; a fingerprint from the declared source and a hash of a sample
of its vectors). A vector of another width, or all zeros, is not adopted (its document
is); a row with no text is skipped. Each is counted and reported.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from segue import db, registry
from segue.providers import ADOPTED
from segue.ratelimit import per_second
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import encode_change
from segue.spec import ModelProfile, ModelSpec

log = logging.getLogger("segue.importer")

FINGERPRINT_SAMPLE = 64  # stored vectors hashed into an adopted model's fingerprint
TIME_TYPES = {"timestamp with time zone", "timestamp without time zone", "date"}
INTEGER_BITS = {"smallint": 16, "integer": 32, "bigint": 64}
INTEGER_TYPES = set(INTEGER_BITS)
TEXT_TYPES = {"text", "character varying", "character"}
ID_TYPES = INTEGER_TYPES | TEXT_TYPES | {"uuid"}
# A staged row (s) that may be written: it has text, a storable id, and is newer than its tombstone (t), if any.
ELIGIBLE = "s.body IS NOT NULL AND length(s.doc_id) BETWEEN 1 AND 512 AND (t.version IS NULL OR s.version > t.version)"


class ImportRefused(RuntimeError):
    """An import that cannot run as asked (unknown table or column, unusable types)."""


@dataclass(frozen=True)
class Source:
    """What to read: a table of some database, its id, text, version, metadata and vector columns."""

    url: str
    table: str
    id_column: str
    text_columns: tuple[str, ...] = ()
    text_expression: str | None = None
    version_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    vector_column: str | None = None

    @property
    def identity(self) -> str:
        """A name for this source that survives restarts: host, database, table, id and vector columns."""
        parts = urlsplit(self.url)
        where = f"{parts.hostname or 'local'}{parts.path}" if parts.scheme else "local"
        return f"{where}/{self.table}#{self.id_column}" + (f"@{self.vector_column}" if self.vector_column else "")


@dataclass
class ImportReport:
    """Rows read, written (with and without an adopted vector), skipped, and why."""

    read: int = 0
    written: int = 0
    superseded: int = 0  # a newer version was already stored
    skipped: Counter[str] = field(default_factory=Counter)  # rows not imported, by reason
    vectors_not_adopted: Counter[str] = field(default_factory=Counter)  # documents imported without their vector
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.read / self.seconds if self.seconds else 0.0
        lines = [f"read {self.read} rows in {self.seconds:.1f}s ({rate:,.0f} rows/s); wrote {self.written} documents"
                 f", {self.superseded} already stored at a newer version"]
        lines += [f"skipped {n} row(s): {why}" for why, n in sorted(self.skipped.items()) if n]
        lines += [f"imported {n} document(s) without their vector: {why}" for why, n in
                  sorted(self.vectors_not_adopted.items()) if n]
        return lines


def _split(table: str) -> sql.Composable:
    schema, _, name = table.rpartition(".")
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def _column_types(source_conn: psycopg.Connection, table: str) -> dict[str, tuple[str, int]]:
    """{column: (type name, typmod)} of ``table``; raises when it does not exist."""
    rows = source_conn.execute(
        "SELECT a.attname, format_type(a.atttypid, NULL), a.atttypmod FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped", (table,)).fetchall()
    if not rows:
        raise ImportRefused(f"no table {table!r} in the source database")
    return {name: (type_name, typmod) for name, type_name, typmod in rows}


def _check(source: Source, types: dict[str, tuple[str, int]]) -> None:
    named = [source.id_column, *source.text_columns, *source.metadata_columns]
    named += [c for c in (source.version_column, source.vector_column) if c]
    missing = [c for c in named if c not in types]
    if missing:
        raise ImportRefused(f"{source.table} has no column {', '.join(map(repr, missing))}")
    if types[source.id_column][0] not in ID_TYPES:
        raise ImportRefused(f"--id-column {source.id_column} is {types[source.id_column][0]}: "
                           "use an integer, text or uuid column")
    if bool(source.text_columns) == bool(source.text_expression):
        raise ImportRefused("give the text as --text-column (one or more) or as --text-expression, not both")
    if source.version_column and types[source.version_column][0] not in TIME_TYPES | INTEGER_TYPES:
        raise ImportRefused(f"--version-column {source.version_column} is {types[source.version_column][0]}: "
                           "use an integer or timestamp column")
    if source.vector_column and types[source.vector_column][0] != "vector":
        raise ImportRefused(f"--vector-column {source.vector_column} is {types[source.vector_column][0]}, not vector")


def _rows(source: Source, types: dict[str, tuple[str, int]]) -> sql.Composed:
    """The source's rows as Segue sees them: key (the id, natively typed), doc_id, body, version, metadata, vec."""
    text = (sql.SQL(source.text_expression) if source.text_expression else
            sql.SQL("concat_ws(E'\\n\\n', {})").format(sql.SQL(", ").join(map(sql.Identifier, source.text_columns)))
            if len(source.text_columns) > 1 else sql.Identifier(source.text_columns[0]))
    if not source.version_column:
        version = sql.SQL("0")
    elif types[source.version_column][0] in TIME_TYPES:  # microseconds since the epoch: monotone with the time
        version = sql.SQL("(extract(epoch FROM {}) * 1000000)").format(sql.Identifier(source.version_column))
    else:
        version = sql.Identifier(source.version_column)
    metadata = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(c)) for c in source.metadata_columns))
    vector = sql.Identifier(source.vector_column) if source.vector_column else sql.SQL("NULL")
    return sql.SQL(
        "SELECT {id} AS key, {id}::text AS doc_id, ({text})::text AS body, coalesce({version}, 0)::int8 AS version,"
        " {metadata} AS metadata, {vector}::vector AS vec FROM {table}"
    ).format(id=sql.Identifier(source.id_column), text=text, version=version, metadata=metadata, vector=vector,
             table=_split(source.table))


def _page_queries(source: Source, types: dict[str, tuple[str, int]]) -> tuple[sql.Composed, sql.Composed]:
    """(the last id of the next page after a watermark, the rows up to it typed as the staging table is).

    Params: (watermark, watermark, page size) and (watermark, watermark, last id); a None
    watermark means from the start.
    """
    key_type = sql.SQL(types[source.id_column][0])
    id_ = sql.Identifier(source.id_column)

    def after(key: sql.Composable) -> sql.Composed:
        return sql.SQL("(%s::text IS NULL OR {key} > %s::{key_type})").format(key=key, key_type=key_type)

    last = sql.SQL("SELECT k::text FROM (SELECT {id} AS k FROM {table} WHERE {after} ORDER BY {id} LIMIT %s) p"
                   " ORDER BY k DESC LIMIT 1").format(id=id_, table=_split(source.table), after=after(id_))
    rows = sql.SQL("COPY (SELECT doc_id, body, version, metadata, vec, row_number() OVER (ORDER BY key) FROM ({rows}) r"
                   " WHERE {after} AND key <= %s::{key_type} ORDER BY key) TO STDOUT (FORMAT BINARY)"
                   ).format(rows=_rows(source, types), key_type=key_type, after=after(sql.Identifier("key")))
    return last, rows


@dataclass(frozen=True)
class _SourcePage:
    """One page as read from the source: its rows in COPY BINARY form, and its last id (None: no rows left)."""

    data: bytes
    last: str | None


def _read_page(source_conn: psycopg.Connection, queries: tuple[sql.Composed, sql.Composed], watermark: str | None,
               page_size: int) -> _SourcePage:
    last_query, rows_query = queries
    row = source_conn.execute(last_query, (watermark, watermark, page_size)).fetchone()
    if row is None:
        return _SourcePage(b"", None)
    last = row[0]
    with source_conn.cursor() as cursor, cursor.copy(rows_query, (watermark, watermark, last)) as out:
        return _SourcePage(b"".join(out), last)


def adopt_model(conn: psycopg.Connection, source_conn: psycopg.Connection, source: Source, name: str,
                types: dict[str, tuple[str, int]]) -> ModelSpec:
    """Register (or find, when resuming) model ``name`` for the vectors of ``source.vector_column``."""
    column = sql.Identifier(source.vector_column)
    dim = types[source.vector_column][1]
    if dim <= 0:  # an untyped vector column: the width most of its rows have
        row = source_conn.execute(
            sql.SQL("SELECT vector_dims({c}) FROM {t} WHERE {c} IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
            .format(c=column, t=_split(source.table))).fetchone()
        if row is None:
            raise ImportRefused(f"{source.table}.{source.vector_column} holds no vector to adopt")
        dim = row[0]
    sample = source_conn.execute(  # the first rows by id (an index scan), of which those of the model's width
        sql.SQL("SELECT k::text, v::text FROM (SELECT {id} AS k, {c} AS v FROM {t} WHERE {c} IS NOT NULL"
                " ORDER BY {id} LIMIT %s) s WHERE vector_dims(v) = %s ORDER BY k LIMIT %s").format(
            id=sql.Identifier(source.id_column), c=column, t=_split(source.table)),
        (16 * FINGERPRINT_SAMPLE, dim, FINGERPRINT_SAMPLE)).fetchall()
    digest = hashlib.sha256(json.dumps({"provider": ADOPTED, "source": source.identity, "dim": dim,
                                        "sample": sample}, sort_keys=True).encode()).hexdigest()
    profile = ModelProfile(provider=ADOPTED, dim=dim, max_tokens=0,
                           config={"source": source.identity, "sampled_vectors": len(sample)}, fingerprint=digest)
    try:
        existing = registry.get_model(conn, name).spec
    except registry.RegistryError:
        return registry.register_model(conn, name, source.identity, profile=profile)
    if source.identity not in (existing.config.get("source"), existing.config.get("adopted_from")):
        raise ImportRefused(f"model {name!r} is already registered for something else ({existing.source})")
    if existing.dim != dim:
        raise ImportRefused(f"model {name!r} is {existing.dim}-d; {source.table}.{source.vector_column} is {dim}-d")
    return existing


def run_import(conn: psycopg.Connection, source: Source, *, model: str | None, page_size: int,
               rate: float | None, console: Console | None) -> ImportReport:
    """Import ``source`` into ``conn``'s documents (adopting its vectors as ``model``), resuming after its
    watermark; returns what was read, written and skipped."""
    report = ImportReport()
    started = time.perf_counter()
    with psycopg.connect(source.url, autocommit=True) as source_conn:
        source_conn.execute("SET default_transaction_read_only = on")
        types = _column_types(source_conn, source.table)
        _check(source, types)
        if bool(model) != bool(source.vector_column):
            raise ImportRefused("--vector-column and --model go together: the model whose vectors the column holds")
        spec = adopt_model(conn, source_conn, source, model, types) if model else None
        newest = sql.SQL("SELECT max(version) FROM ({}) r").format(_rows(source, types))
        watermark = _watermark(conn, source.identity, lambda: source_conn.execute(newest).fetchone()[0])
        _stage_in_memory(conn)
        (estimate,) = source_conn.execute("SELECT greatest(reltuples::bigint, 0) FROM pg_class"
                                          " WHERE oid = to_regclass(%s)", (source.table,)).fetchone()
        queries = _page_queries(source, types)
        pace = per_second(rate, burst=page_size) if rate else None
        progress = Progress(TextColumn(f"import {source.table}"), BarColumn(), MofNCompleteColumn(),
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
            conn.execute(
                "INSERT INTO migration_changelog (model_version, action, origin, detail) VALUES (%s, %s, %s, %s)",
                (spec.version if spec else None, Action.IMPORTED.value, Origin.CONTROL.value,
                 Jsonb({"source": source.identity, "read": report.read, "written": report.written,
                        "superseded": report.superseded, "skipped": report.skipped,
                        "vectors_not_adopted": report.vectors_not_adopted})))
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


def _stage_in_memory(conn: psycopg.Connection) -> None:
    """Give this session room to hold a staged page in memory (only possible before its first temporary table)."""
    if conn.execute("SELECT pg_my_temp_schema() = 0").fetchone()[0]:
        conn.execute("SET temp_buffers = '256MB'")


def _page(conn: psycopg.Connection, source: Source, spec: ModelSpec | None, page: _SourcePage,
          report: ImportReport) -> None:
    """Stage one page and write it, with its watermark, in one transaction; counts it in ``report``."""
    with conn.transaction():
        conn.execute("SET LOCAL work_mem = '256MB'")  # the page is sorted by doc_id in memory, not on disk
        conn.execute("CREATE TEMP TABLE segue_import (doc_id text, body text, version int8, metadata jsonb,"
                     " vec vector, ord int8) ON COMMIT DROP")
        with conn.cursor() as cursor, cursor.copy("COPY segue_import FROM STDIN (FORMAT BINARY)") as into:
            into.write(page.data)
        dim = spec.dim if spec else 0
        rows, no_text, long_id, no_vector, wrong_dim, zero, eligible = conn.execute(
            "SELECT count(*),"
            " count(*) FILTER (WHERE s.body IS NULL),"
            " count(*) FILTER (WHERE length(s.doc_id) NOT BETWEEN 1 AND 512),"
            " count(*) FILTER (WHERE s.body IS NOT NULL AND s.vec IS NULL),"
            " count(*) FILTER (WHERE s.body IS NOT NULL AND vector_dims(s.vec) <> %(dim)s),"
            " count(*) FILTER (WHERE s.body IS NOT NULL AND vector_dims(s.vec) = %(dim)s AND vector_norm(s.vec) = 0),"
            f" count(*) FILTER (WHERE {ELIGIBLE})"
            " FROM segue_import s LEFT JOIN document_tombstones t ON t.doc_id = s.doc_id", {"dim": dim}).fetchone()
        written = _write(conn, source, spec)
        report.read += rows
        report.written += written
        report.superseded += eligible - written
        report.skipped.update({"no text": no_text, "doc_id not 1 to 512 characters": long_id})
        if spec is not None:
            report.vectors_not_adopted.update({"no vector": no_vector, f"dimension mismatch (not {dim})": wrong_dim,
                                               "all-zero vector": zero})
        conn.execute("UPDATE import_progress SET watermark = %s, rows_read = rows_read + %s, updated_at = now()"
                     " WHERE source = %s", (page.last, rows, source.identity))


def _write(conn: psycopg.Connection, source: Source, spec: ModelSpec | None) -> int:
    """Upsert the staged page with the change pipeline's version rules; returns the rows written."""
    columns = [sql.Identifier(c) for c in ("doc_id", "body", "version", "content_sha256", "metadata", "source_topic",
                                           "source_partition", "source_offset")]
    values = [sql.SQL("s.doc_id, s.body, s.version, sha256(convert_to(s.body, 'UTF8')), s.metadata, {}, 0, s.ord")
              .format(sql.Literal(f"import:{source.identity}"))]
    updates = [sql.SQL("body = excluded.body, version = excluded.version, content_sha256 = excluded.content_sha256,"
                       " metadata = excluded.metadata, updated_at = now(), source_topic = excluded.source_topic,"
                       " source_partition = excluded.source_partition, source_offset = excluded.source_offset")]
    newer = sql.SQL("d.version < excluded.version")
    if spec is not None:
        v, h = db.vector_column(spec.version), db.sha_column(spec.version)
        good = sql.SQL("vector_dims(s.vec) = {dim} AND vector_norm(s.vec) > 0").format(dim=sql.Literal(spec.dim))
        columns += [v, h]
        values.append(sql.SQL("CASE WHEN {good} THEN s.vec::vector({dim}) END,"
                              " CASE WHEN {good} THEN sha256(convert_to(s.body, 'UTF8')) END")
                      .format(good=good, dim=sql.Literal(spec.dim)))
        updates.append(sql.SQL("{v} = CASE WHEN excluded.{h} IS NULL THEN d.{v} ELSE excluded.{v} END,"
                               " {h} = coalesce(excluded.{h}, d.{h})").format(v=v, h=h))
        # Resuming, or adopting the vectors of documents already imported at this version: same content, no vector.
        newer = sql.SQL("({newer} OR (d.version = excluded.version AND d.content_sha256 = excluded.content_sha256"
                        " AND d.{h} IS NULL AND excluded.{h} IS NOT NULL))").format(newer=newer, h=h)
    eligible_rows = sql.SQL(
        f"FROM segue_import s LEFT JOIN document_tombstones t ON t.doc_id = s.doc_id WHERE {ELIGIBLE}")
    return conn.execute(sql.SQL(
        "INSERT INTO documents AS d ({columns}) SELECT {values} {rows} ORDER BY s.doc_id"
        " ON CONFLICT (doc_id) DO UPDATE SET {updates} WHERE {newer}"
    ).format(columns=sql.SQL(", ").join(columns), values=sql.SQL(", ").join(values), rows=eligible_rows,
             updates=sql.SQL(", ").join(updates), newer=newer)).rowcount


async def follow(conn: psycopg.Connection, source: Source, producer, topic: str, *, poll_s: float,
                 deletes_every_s: float, page_size: int) -> None:
    """Keep Segue in step with ``source`` for users who cannot publish events yet, until cancelled.

    Rows whose version moved past the last one published are published as document
    changes (workers embed them with every model Segue runs); every ``deletes_every_s``
    an anti-join finds stored documents the table no longer has and publishes their
    tombstones. The table is taken to be the corpus' source of truth.
    """
    if not source.version_column:
        raise ImportRefused("--follow needs --version-column: it publishes the rows whose version moved")
    with psycopg.connect(source.url, autocommit=True) as source_conn:
        source_conn.execute("SET default_transaction_read_only = on")
        types = _column_types(source_conn, source.table)
        rows_of = _rows(source, types)
        key_type = sql.SQL(types[source.id_column][0])
        changed = sql.SQL(  # keyset on (version, id): a bulk update gives many rows one version
            "SELECT doc_id, body, version, metadata FROM ({rows}) r WHERE (version, key) > (%s, %s::{key_type})"
            " AND body IS NOT NULL ORDER BY version, key LIMIT %s").format(rows=rows_of, key_type=key_type)
        row = conn.execute("SELECT follow_version, follow_key FROM import_progress WHERE source = %s",
                           (source.identity,)).fetchone()
        if row is None:
            raise ImportRefused(f"{source.table} was never imported: run segue import before --follow")
        since, after = (row[0], row[1]) if row[0] is not None else (-1, None)
        last_deletes = 0.0
        while True:
            rows = source_conn.execute(changed, (since, after, page_size)).fetchall()
            if rows:
                deliveries = [await producer.send(topic, key=doc_id.encode(),
                                                  value=encode_change(doc_id, version=version, text=body,
                                                                      metadata=metadata))
                              for doc_id, body, version, metadata in rows]
                await asyncio.gather(*deliveries)
                after, since = rows[-1][0], rows[-1][2]
                conn.execute("UPDATE import_progress SET follow_version = %s, follow_key = %s, updated_at = now()"
                             " WHERE source = %s", (since, after, source.identity))
                log.info("published %d changed rows of %s (up to version %d)", len(rows), source.table, since)
            if time.monotonic() - last_deletes >= deletes_every_s:
                gone = _deleted(conn, source_conn, source, types)
                if gone:
                    await asyncio.gather(*[await producer.send(topic, key=doc_id.encode(), value=None)
                                           for doc_id in gone])
                    log.info("published %d tombstones for rows gone from %s", len(gone), source.table)
                last_deletes = time.monotonic()
            if len(rows) < page_size:
                await asyncio.sleep(poll_s)


def _deleted(conn: psycopg.Connection, source_conn: psycopg.Connection, source: Source,
             types: dict[str, tuple[str, int]], chunk: int = 1000) -> list[str]:
    """Stored doc_ids the source table no longer has (an anti-join, a chunk of ids at a time).

    Only ids that could be the table's are looked for: with an integer id column, a
    stored document whose id is not an integer (published by someone else) is not its.
    """
    gone, after = [], ""
    type_name = types[source.id_column][0]
    id_ = sql.Identifier(source.id_column)
    present = sql.SQL("SELECT {id}::text FROM {t} WHERE {id} = ANY(%s::{type}[])").format(
        id=id_, t=_split(source.table), type=sql.SQL(types[source.id_column][0]))
    while ids := [d for (d,) in conn.execute("SELECT doc_id FROM documents WHERE doc_id > %s ORDER BY doc_id LIMIT %s",
                                             (after, chunk)).fetchall()]:
        after = ids[-1]
        ids = [d for d in ids if _could_be_id(d, type_name)]
        found = {d for (d,) in source_conn.execute(present, (ids,)).fetchall()}
        gone += [d for d in ids if d not in found]
    return gone


def _could_be_id(doc_id: str, type_name: str) -> bool:
    """Whether ``doc_id`` is the text form of a value of the id column's type."""
    if type_name in INTEGER_TYPES:
        bound = 2 ** (INTEGER_BITS[type_name] - 1)
        return re.fullmatch(r"-?[0-9]{1,19}", doc_id) is not None and -bound <= int(doc_id) < bound
    if type_name == "uuid":
        try:
            return str(uuid.UUID(doc_id)) == doc_id
        except ValueError:
            return False
    return True
