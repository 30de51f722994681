"""``segue import`` and ``--follow`` against hostile source tables.

A property (Hypothesis) imports generated tables: integer, text, varchar(n), char(n) and uuid
ids, with or without a primary key (then NULL and duplicated ids); integer, bigint and
timestamptz versions, NULL, negative and infinite ones, or none; one to three text columns
holding NULL, empty, white-space or real text; a vector column typed or not, with vectors of
the right width, another width, all zeros or none; quoted, mixed-case and ``%``-holding table
and column names, a schema-qualified table; some read by a role under row-level security. Into
a target already holding documents and tombstones of the same ids at older, equal and newer
versions, and others of other ids. Every row read lands exactly (doc_id, body, version,
metadata, its vector bit for bit when it can be adopted) or is counted under its reason; the
counts add up to the rows read; nothing else in the target changes; importing again writes
nothing.

Then the user-visible refusals of the command line, and a drill of ``--follow`` (in process,
with a worker of its own applying what it publishes) against a table keyed by ``char(8)``
whose version is a per-row revision counter: a role that row-level security hides rows from, a
row revised below the newest revision, a long transaction committing a row late at an old
revision, a row of white space, a TRUNCATE and reload, a real delete, a row back at the version
it was deleted at. Afterwards the corpus is what the table holds, and nothing the table holds
was ever deleted for good.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pgvector.psycopg import register_vector
from psycopg import sql

from segue.control import importer, registry
from segue.control.importer import ImportRefused, Source
from segue.storage import connections, model_columns, upgrades
from segue.worker.topics import ensure_topics
from tests.harness import change, wait_for

READER, READER_PASSWORD = "hostile_reader", "reader-secret-4711"
DRILL_TOPICS = {"topic_document_changes": "hostile-changes", "topic_read_misses": "hostile-read-misses",
                "topic_dead_letters": "hostile-dead-letters", "topic_backfill": "hostile-backfill"}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_VERSION = 2**63 - 1
UNRELATED_DOCUMENT = ("§unrelated", "published by someone else", 7)  # '§' is in no generated id
UNRELATED_TOMBSTONE = ("§deleted", 9)


def database(h, name: str, user: str = "postgres", password: str = "") -> str:
    """The harness's database URL, for database ``name`` as ``user``."""
    return urlunsplit(urlsplit(h.database_url)._replace(netloc=f"{user}:{password}@", path=f"/{name}"))


@dataclass(frozen=True)
class Databases:
    source: str  # the source database, as its owner (a superuser)
    reader: str  # the same, as a role without privileges beyond what each table grants it
    target: str  # the property's Segue database
    follow: str  # the drill's Segue database


@pytest.fixture(scope="module")
def dbs(harness) -> Databases:
    for name in ("hostile_source", "hostile_target", "hostile_follow"):
        harness.conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    found = Databases(database(harness, "hostile_source"), database(harness, "hostile_source", READER, READER_PASSWORD),
                      database(harness, "hostile_target"), database(harness, "hostile_follow"))
    with psycopg.connect(found.source, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute('CREATE SCHEMA "Src Schema"')
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(READER),
                                                                       sql.Literal(READER_PASSWORD)))
        conn.execute(sql.SQL('GRANT USAGE ON SCHEMA "Src Schema" TO {}').format(sql.Identifier(READER)))
    for url in (found.target, found.follow):
        upgrades.upgrade(harness.settings, url)
    return found


# -- the property ------------------------------------------------------------------------------------------
ID_TEXT = "aZé%'\\ _-\u00a0😀"
TEXT = "aé%'\\\u200b \t\n\u00a0\u2003\u3000"  # white space (each is, for Python and for Segue) and not
FLOAT = st.floats(width=32, allow_nan=False, allow_infinity=False)
ID_VALUES = {
    "smallint": st.integers(-(2**15), 2**15 - 1),
    "integer": st.integers(-(2**31), 2**31 - 1),
    "bigint": st.integers(-(2**63), 2**63 - 1),
    "text": st.text(ID_TEXT, max_size=6) | st.just("x" * 513),
    "character varying(12)": st.text(ID_TEXT, max_size=12),
    "character(6)": st.text(ID_TEXT, max_size=6),
    "uuid": st.uuids(),
}
VERSIONS = {
    "integer": st.none() | st.integers(-3, 2**31 - 1),
    "bigint": st.none() | st.integers(-3, MAX_VERSION),
    "timestamp with time zone": st.none() | st.sampled_from(["infinity", "-infinity"])
    | st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(timezone.utc)),
}
VECTORS = {
    "vector(3)": st.none() | st.lists(FLOAT, min_size=3, max_size=3) | st.just([0.0, -0.0, 0.0]),
    "vector": st.none() | st.lists(FLOAT, min_size=1, max_size=4) | st.just([0.0, 0.0, 0.0]),
}
TABLES = [  # (schema, relation, what --table says)
    ("public", "items", "items"), ("public", "items", "public.items"), ("public", "Items", "Items"),
    ("public", "Items", '"Items"'), ("public", "My %s Items", "My %s Items"),
    ("Src Schema", "Items", '"Src Schema"."Items"'), ("Src Schema", "Items", "Src Schema.Items"),
]
models = itertools.count()


@dataclass(frozen=True)
class Row:
    id: Any
    version: Any
    texts: tuple[str | None, ...]
    lang: str | None
    vector: list[float] | None
    shown: bool
    seeded: tuple[str, int] | None  # the target holds a "document" or a "tombstone" of its id, this many versions off


@dataclass(frozen=True)
class Case:
    schema: str
    relation: str
    typed: str
    id_type: str
    primary_key: bool
    version_type: str | None
    text_columns: tuple[str, ...]
    metadata: bool
    vector_type: str | None
    rls: bool
    rows: tuple[Row, ...]
    page_size: int


@st.composite
def cases(draw) -> Case:
    schema, relation, typed = draw(st.sampled_from(TABLES))
    id_type = draw(st.sampled_from(sorted(ID_VALUES)))
    primary_key, version_type = draw(st.booleans()), draw(st.sampled_from([None, *VERSIONS]))
    text_columns = tuple(draw(st.lists(st.sampled_from(["body", "Title", "x%y"]), min_size=1, max_size=3,
                                       unique=True)))
    metadata, vector_type, rls = draw(st.booleans()), draw(st.sampled_from([None, *VECTORS])), draw(st.booleans())
    ids = draw(st.lists(ID_VALUES[id_type], max_size=10, unique_by=lambda value: doc_id_of(id_type, value)))
    if not primary_key:  # NULL ids, and ids twice when versions can tell the rows apart
        ids += draw(st.lists(st.none(), max_size=2))
        if version_type and ids:
            ids += draw(st.lists(st.sampled_from(ids), max_size=3))
    rows = tuple(Row(
        id=id_,
        version=draw(VERSIONS[version_type]) if version_type else None,
        texts=tuple(draw(st.none() | st.text(TEXT, max_size=4)) for _ in text_columns),
        lang=draw(st.none() | st.text(ID_TEXT, max_size=3)) if metadata else None,
        vector=draw(VECTORS[vector_type]) if vector_type else None,
        shown=draw(st.booleans()) if rls else True,
        seeded=draw(st.none() | st.tuples(st.sampled_from(["document", "tombstone"]), st.sampled_from([-1, 0, 1]))),
    ) for id_ in ids)
    return Case(schema, relation, typed, id_type, primary_key, version_type, text_columns, metadata, vector_type,
                rls, rows, draw(st.integers(1, 4)))


def doc_id_of(id_type: str, value: Any) -> str:
    """An id's text, as PostgreSQL writes it (a char(n) without its padding)."""
    return value.rstrip(" ") if id_type.startswith("character(") else str(value)


def version_of(row: Row) -> int | None:
    """The version Segue gives the row: 0 without one, None when the contract cannot carry it."""
    if row.version is None:
        return 0
    if isinstance(row.version, str):  # ±infinity
        return None
    version = (row.version - EPOCH) // timedelta(microseconds=1) if isinstance(row.version, datetime) else row.version
    return version if 0 <= version <= MAX_VERSION else None


def body_of(case: Case, row: Row) -> str | None:
    """The row's text as Segue stores it, None when it has none (NULL, empty, only white space)."""
    present = [text for text in row.texts if text is not None]
    body = "\n\n".join(present) if len(case.text_columns) > 1 else row.texts[0]
    return body if body is not None and body.strip() else None


@dataclass
class Expected:
    """What the import must report and leave behind."""

    skipped: Counter
    written: dict[str, Row]
    superseded: int
    vectors_not_adopted: Counter
    documents: dict[str, tuple]  # doc_id: (body, version, metadata, vector bytes or None)
    tombstones: dict[str, int]
    dim: int | None


def expect(case: Case) -> tuple[Expected, dict[str, tuple[str, int]]]:
    """The outcome of importing ``case`` into a target seeded as the rows say; and that seed ({doc_id: (kind,
    version)})."""
    visible = [row for row in case.rows if row.shown]
    skipped, usable = Counter(), defaultdict(list)
    for row in visible:
        doc_id = None if row.id is None else doc_id_of(case.id_type, row.id)
        if doc_id is None:
            skipped[importer.NO_ID] += 1
        elif not 1 <= len(doc_id) <= 512:
            skipped[importer.BAD_DOC_ID] += 1
        elif body_of(case, row) is None:
            skipped[importer.NO_TEXT] += 1
        elif version_of(row) is None:
            skipped[importer.BAD_VERSION] += 1
        else:
            usable[doc_id].append(row)
    widths = Counter(len(row.vector) for row in visible if row.vector is not None)
    dim = 3 if case.vector_type == "vector(3)" else min(widths, key=lambda w: (-widths[w], w)) if widths else None
    seed, written, superseded = {}, {}, 0
    documents = {UNRELATED_DOCUMENT[0]: (UNRELATED_DOCUMENT[1], UNRELATED_DOCUMENT[2], {}, None)}
    tombstones = dict([UNRELATED_TOMBSTONE])
    for doc_id, rows in usable.items():
        newest = max(version_of(row) for row in rows)
        winners = [row for row in rows if version_of(row) == newest]
        assume(len(winners) == 1)  # rows of one id at one version: either may be taken
        skipped[importer.DUPLICATE_ID] += len(rows) - 1
        winner, first = winners[0], rows[0]
        if first.seeded and 0 <= newest + first.seeded[1] <= MAX_VERSION:
            seed[doc_id] = (first.seeded[0], newest + first.seeded[1])
        kind, seeded_version = seed.get(doc_id, (None, None))
        if kind == "document":
            documents[doc_id] = ("stored before", seeded_version, {}, None)
        elif kind == "tombstone":
            tombstones[doc_id] = seeded_version
        if kind == "tombstone" and seeded_version > newest:
            skipped[importer.DELETED_NEWER] += 1
        elif kind == "document" and seeded_version >= newest:
            superseded += 1
        else:
            written[doc_id] = winner
            tombstones.pop(doc_id, None)
    vectors_not_adopted = Counter()
    for doc_id, row in written.items():
        why = None if case.vector_type is None else (
            "no vector" if row.vector is None else f"dimension mismatch (not {dim})" if len(row.vector) != dim
            else "all-zero vector" if not any(row.vector) else None)
        vectors_not_adopted.update([why] if why else [])
        documents[doc_id] = (body_of(case, row), version_of(row), {"Lang%": row.lang} if case.metadata else {},
                             None if why or case.vector_type is None else np.float32(row.vector).tobytes())
    return Expected(skipped, written, superseded, vectors_not_adopted, documents, tombstones, dim), seed


def create_source(conn: psycopg.Connection, case: Case) -> None:
    """The case's table in the source database, its rows in, read-only to the reader (under RLS if the case says)."""
    table = sql.Identifier(case.schema, case.relation)
    columns = [sql.SQL("{} {}{}").format(sql.Identifier("Doc Id"), sql.SQL(case.id_type),
                                         sql.SQL(" PRIMARY KEY" if case.primary_key else ""))]
    values: list[Callable[[Row], Any]] = [lambda row: row.id]
    for n, name in enumerate(case.text_columns):
        columns.append(sql.SQL("{} text").format(sql.Identifier(name)))
        values.append(lambda row, n=n: row.texts[n])
    for name, type_, value in [("Rev%", case.version_type, lambda row: row.version),
                               ("Lang%", "text" if case.metadata else None, lambda row: row.lang),
                               ("Embedding", case.vector_type,
                                lambda row: None if row.vector is None else np.float32(row.vector)),
                               ("shown", "boolean", lambda row: row.shown)]:
        if type_:
            columns.append(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_)))
            values.append(value)
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(columns)))
    with conn.cursor() as cursor, cursor.copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
        for row in case.rows:
            copy.write_row([value(row) for value in values])
    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(READER)))
    if case.rls:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        conn.execute(sql.SQL("CREATE POLICY shown ON {} FOR SELECT TO {} USING (shown)").format(
            table, sql.Identifier(READER)))


def seed_target(conn: psycopg.Connection, seed: dict[str, tuple[str, int]]) -> None:
    """Empty the target, then give it the unrelated document and tombstone and the case's seeded ones."""
    conn.execute("DELETE FROM documents")  # not TRUNCATE: the corpus counters' triggers see it
    conn.execute("TRUNCATE document_tombstones, import_progress, migration_changelog")
    documents = [UNRELATED_DOCUMENT] + [(d, "stored before", v) for d, (kind, v) in seed.items() if kind == "document"]
    tombstones = [UNRELATED_TOMBSTONE] + [(d, v) for d, (kind, v) in seed.items() if kind == "tombstone"]
    with conn.cursor() as cursor:
        cursor.executemany("INSERT INTO documents (doc_id, body, version, content_sha256, metadata)"
                           " VALUES (%s, %s, %s, sha256(convert_to(%s, 'UTF8')), '{}')",
                           [(d, body, v, body) for d, body, v in documents])
        cursor.executemany("INSERT INTO document_tombstones (doc_id, version) VALUES (%s, %s)", tombstones)


def target_state(conn: psycopg.Connection, model: str | None) -> tuple[dict[str, tuple], dict[str, int]]:
    """The target's documents ({doc_id: (body, version, metadata, vector bytes)}) and tombstones."""
    vector = sql.SQL("NULL")
    if model is not None and any(m.spec.name == model for m in registry.list_models(conn)):
        vector = model_columns.vector_column(registry.get_model(conn, model).spec.version)
    rows = conn.execute(sql.SQL("SELECT doc_id, body, version, metadata, {}, content_sha256 FROM documents").format(
        vector), binary=True).fetchall()  # binary: the vectors' float4s as stored
    assert all(sha == hashlib.sha256(body.encode()).digest() for _, body, _, _, _, sha in rows)
    documents = {d: (body, v, metadata, None if vec is None else vec.to_numpy().tobytes())
                 for d, body, v, metadata, vec, _ in rows}
    return documents, dict(conn.execute("SELECT doc_id, version FROM document_tombstones").fetchall())


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases())
def test_every_row_of_a_generated_table_lands_exactly_or_is_counted_under_its_reason(harness, dbs, case):
    expected, seed = expect(case)
    model = f"adopted-{next(models)}" if case.vector_type else None
    url = dbs.reader if case.rls else dbs.source
    source = Source(url=url, table=case.typed, id_column="Doc Id", text_columns=case.text_columns,
                    version_column="Rev%" if case.version_type else None,
                    metadata_columns=("Lang%",) if case.metadata else (),
                    vector_column="Embedding" if case.vector_type else None)
    with psycopg.connect(dbs.source, autocommit=True) as owner, connections.connect(harness.settings, dbs.target) as conn:
        register_vector(owner)
        table = sql.Identifier(case.schema, case.relation)
        try:
            create_source(owner, case)
            seed_target(conn, seed)
            before = target_state(conn, None)
            if case.vector_type and expected.dim is None:  # an untyped column without a vector it shows
                with pytest.raises(ImportRefused, match="holds no vector to adopt"):
                    importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
                assert target_state(conn, None) == before
                return
            report = importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
            assert report.read == sum(row.shown for row in case.rows)
            assert +report.skipped == expected.skipped
            assert (report.written, report.superseded) == (len(expected.written), expected.superseded)
            assert report.written + report.superseded + sum(report.skipped.values()) == report.read
            assert +report.vectors_not_adopted == expected.vectors_not_adopted
            if model:
                assert registry.get_model(conn, model).spec.dim == expected.dim
            after = target_state(conn, model)
            assert after == (expected.documents, expected.tombstones)
            again = importer.run_import(conn, source, model=model, page_size=case.page_size, rate=None, console=None)
            assert (again.written, again.superseded) == (0, report.written + report.superseded)
            assert +again.skipped == expected.skipped and target_state(conn, model) == after
            if case.rls:  # the reader's password is in its URL, and nowhere in Segue
                dumped = conn.execute("SELECT concat((SELECT json_agg(p) FROM import_progress p),"
                                      " (SELECT json_agg(c) FROM migration_changelog c),"
                                      " (SELECT json_agg(m) FROM embedding_models m))").fetchone()[0]
                assert READER_PASSWORD not in dumped
        finally:
            owner.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))


# -- the command line ---------------------------------------------------------------------------------------
def cli_env(harness, dbs: Databases) -> dict[str, str]:
    return {**harness.env, "SEGUE_DATABASE_URL": dbs.target}


ATTACKS = {  # a --text-expression: what the user is told
    "NULL)::text AS body, 0::int8 AS version FROM notes) r; SET default_transaction_read_only = off; COMMIT;"
    " CREATE TABLE pwned (); SELECT count(*) FROM (SELECT (NULL":
        "Error: --text-expression must be one SQL expression over the columns of notes (evaluated read-only): ",
    "CASE WHEN current_setting('default_transaction_read_only') = 'off' THEN nextval('bumped')::text"
    " ELSE set_config('default_transaction_read_only', 'off', false) END || body":
        "Error: ReadOnlySqlTransaction: cannot execute nextval() in a read-only transaction",
}


@pytest.mark.parametrize("expression", ATTACKS, ids=["a second statement", "set_config"])
def test_a_text_expression_cannot_write_to_the_source(harness, dbs, expression):
    """Neither a second statement nor turning default_transaction_read_only off gets a write through; the user
    reads one line saying why."""
    with psycopg.connect(dbs.source, autocommit=True) as owner:
        owner.execute("CREATE TABLE notes (id integer PRIMARY KEY, body text, rev integer)")
        owner.execute("INSERT INTO notes SELECT g, 'note ' || g, g FROM generate_series(1, 5) g")
        owner.execute("CREATE SEQUENCE bumped")
        try:
            done = harness.segue("import", "--source-url", dbs.source, "--table", "notes", "--id-column", "id",
                                 "--text-expression", expression, "--version-column", "rev", "--page-size", "1",
                                 env=cli_env(harness, dbs), check=False)  # a transaction a page
            assert owner.execute("SELECT to_regclass('pwned')").fetchone()[0] is None
            assert owner.execute("SELECT is_called FROM bumped").fetchone()[0] is False
        finally:
            owner.execute("DROP TABLE IF EXISTS notes, pwned")
            owner.execute("DROP SEQUENCE bumped")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(ATTACKS[expression]), done.stderr


def test_a_mixed_case_char_keyed_table_is_imported_by_its_name_as_typed(harness, dbs):
    """``--table Notes`` finds a table created as "Notes"; its char(6) keys page; rows with blank text are skipped."""
    with psycopg.connect(dbs.source, autocommit=True) as owner:
        owner.execute('CREATE TABLE "Notes" (id char(6) PRIMARY KEY, title text, body text)')
        owner.execute("""INSERT INTO "Notes" VALUES ('abc', 'first', 'note'), ('abd', NULL, NULL),"""
                      """ ('abe', ' ', E'\\t\\n'), ('abf', NULL, 'last')""")
        try:
            done = harness.segue("import", "--source-url", dbs.source, "--table", "Notes", "--id-column", "id",
                                 "--text-column", "title", "--text-column", "body", "--page-size", "1",
                                 env=cli_env(harness, dbs))
        finally:
            owner.execute('DROP TABLE "Notes"')
    printed = " ".join(done.stdout.split())
    assert "read 4 rows" in printed and "wrote 2 documents" in printed and "skipped 2 row(s): no text" in printed
    with psycopg.connect(dbs.target) as conn:
        assert dict(conn.execute("SELECT doc_id, body FROM documents WHERE doc_id LIKE 'ab_'").fetchall()) == {
            "abc": "first\n\nnote", "abf": "last"}


# -- the --follow drill --------------------------------------------------------------------------------------
@contextmanager
def following(harness, source: Source, url: str) -> Iterator[Callable[[], bool]]:
    """``importer.follow`` of ``source`` into the drill's Segue, running in a thread until the block ends.

    Yields a check that raises if it stopped on its own.
    """
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=harness.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            with connections.connect(harness.settings, url) as conn:
                await importer.follow(conn, source, producer, DRILL_TOPICS["topic_document_changes"], poll_s=0.2,
                                      reconcile_every_s=0.5, max_delete_fraction=0.05, max_text_bytes=4000,
                                      page_size=10)
        finally:
            await producer.stop()

    task = loop.create_task(run())

    def drive() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the test
            failure.append(error)
        finally:
            loop.close()

    thread = threading.Thread(target=drive, name="follow", daemon=True)
    thread.start()

    def running() -> bool:
        assert thread.is_alive(), f"follow stopped: {failure!r}"
        return True

    try:
        yield running
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=30)
    assert not failure, failure


def test_follow_keeps_the_corpus_what_a_hostile_table_holds(harness, dbs, caplog):
    caplog.set_level("INFO", logger="segue.control.importer")
    owner = psycopg.connect(dbs.source, autocommit=True)
    owner.execute("CREATE TABLE drill (id char(8) PRIMARY KEY, body text NOT NULL, rev integer NOT NULL,"
                  " shown boolean NOT NULL DEFAULT true)")
    owner.execute("INSERT INTO drill (id, body, rev) SELECT 'k' || lpad(g::text, 2, '0'), 'row ' || g,"
                  " CASE WHEN g = 41 THEN 50 ELSE 1 END FROM generate_series(1, 41) g")  # revisions: 1, and one 50
    owner.execute(sql.SQL("GRANT SELECT ON drill TO {}").format(sql.Identifier(READER)))
    owner.execute("ALTER TABLE drill ENABLE ROW LEVEL SECURITY")
    owner.execute(sql.SQL("CREATE POLICY shown ON drill FOR SELECT TO {} USING (shown)").format(sql.Identifier(READER)))
    drill = Source(url=dbs.source, table="drill", id_column="id", text_columns=("body",), version_column="rev")
    settings = harness.settings.model_copy(update={"database_url": dbs.follow, "group_id": "hostile-follow",
                                                   **DRILL_TOPICS})
    asyncio.run(ensure_topics(settings, harness.bootstrap))
    segue = connections.connect(harness.settings, dbs.follow)
    worker = harness.start_worker({**harness.env, "SEGUE_DATABASE_URL": dbs.follow, "SEGUE_GROUP_ID": "hostile-follow",
                                   **{f"SEGUE_{name.upper()}": topic for name, topic in DRILL_TOPICS.items()}})

    def stored(doc_id: str) -> str | None:
        row = segue.execute("SELECT body FROM documents WHERE doc_id = %s", (doc_id,)).fetchone()
        return row and row[0]

    def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    try:
        assert importer.run_import(segue, drill, model=None, page_size=10, rate=None, console=None).written == 41
        harness.publish(DRILL_TOPICS["topic_document_changes"], [("probe", change("probe", "readiness probe", 1))])
        wait_for(lambda: worker.poll() is None and stored("probe"), timeout=120, what="the drill's worker")
        segue.execute("DELETE FROM documents WHERE doc_id = 'probe'")

        # A role that row-level security hides ten rows from: nothing of theirs is deleted; what it sees flows.
        with following(harness, replace(drill, url=dbs.reader), dbs.follow) as running:
            owner.execute("UPDATE drill SET shown = false WHERE id BETWEEN 'k01' AND 'k10'")
            owner.execute("UPDATE drill SET body = 'row 12, revised', rev = 2 WHERE id = 'k12'")  # below the keyset
            with psycopg.connect(dbs.source) as late:  # a long transaction: a row at an old revision, committed late
                late.execute("INSERT INTO drill (id, body, rev) VALUES ('late', 'committed late', 3)")
                owner.execute("INSERT INTO drill (id, body, rev) VALUES ('fresh', 'a new row', 60),"
                              " ('blank', E' \\t\\n', 61)")
                wait_for(lambda: running() and stored("fresh") and logged("skipped 1 row(s) of drill: no text"),
                         what="the new row, and the one without text skipped")
            caplog.clear()
            wait_for(lambda: running() and stored("k12") == "row 12, revised" and stored("late")
                     and logged("not publishing the 10 deletes of drill: row-level security"),
                     what="the revision, the late row, and a pass refusing the hidden rows' deletes")
        assert segue.execute("SELECT count(*) FROM documents WHERE doc_id BETWEEN 'k01' AND 'k10'").fetchone()[0] == 10

        # The owner: a TRUNCATE and reload deletes nothing; a real delete goes; a row back at its version is noted.
        with following(harness, drill, dbs.follow) as running:
            rows = owner.execute("SELECT * FROM drill").fetchall()
            owner.execute("TRUNCATE drill")
            caplog.clear()
            wait_for(lambda: running() and logged("not publishing the deletes of drill"), what="the guard")
            with owner.transaction(), owner.cursor() as cursor:
                cursor.executemany("INSERT INTO drill VALUES (%s, %s, %s, %s)", rows)
            owner.execute("DELETE FROM drill WHERE id = 'k20'")
            wait_for(lambda: running() and stored("k20") is None, what="the delete")
            owner.execute("INSERT INTO drill (id, body, rev) VALUES ('k20', 'row 20', 1)")
            caplog.clear()
            wait_for(lambda: running() and logged("1 row(s) of drill were deleted from Segue at the version"),
                     what="the row back at the version it was deleted at")
        assert segue.execute("SELECT array_agg(doc_id) FROM document_tombstones").fetchone()[0] == ["k20"]

        # segue import restores it: the table is the truth.
        report = importer.run_import(segue, drill, model=None, page_size=10, rate=None, console=None)
        assert (report.read, report.written, report.skipped) == (44, 1, {importer.NO_TEXT: 1})
        table = dict(owner.execute("SELECT id::text, (body, rev::int8)::text FROM drill WHERE id <> 'blank'"))
        corpus = dict(segue.execute("SELECT doc_id, (body, version)::text FROM documents").fetchall())
        assert corpus == table
        assert segue.execute("SELECT count(*) FROM document_tombstones").fetchone()[0] == 0
    finally:
        harness.stop_worker(worker)
        segue.close()
        owner.execute("DROP TABLE drill")
        owner.close()
