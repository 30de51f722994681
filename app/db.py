"""PostgreSQL connections, versioned schema upgrades and the per-model columns and counters.

The schema is a list of ordered upgrade steps (``schemas/upgrades/NNNN_name.sql``);
``schema_migrations`` records the ones applied. :func:`upgrade` applies the missing
ones under an advisory lock, each once and in its own transaction with a short lock
timeout (retried), and does nothing at all on an up-to-date database: no DDL, no lock.

Each registered model version N owns two columns on ``documents``:
``embedding_vN vector(dim)`` and ``embedding_vN_sha256 bytea``. The statement-level
triggers that keep ``vector_counters`` exact are generated here from the list of
live models and regenerated whenever that list changes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TypeVar

import psycopg
from pgvector.psycopg import register_vector, register_vector_async
from psycopg import errors, sql

from segue.locks import Lock, held
from segue.settings import Settings

log = logging.getLogger("segue.db")

T = TypeVar("T")

DDL_LOCK_TIMEOUT_S = 2.0  # a DDL statement waits this long for its lock, then lets queued writes through
DDL_GIVE_UP_S = 300.0  # and is retried with backoff for this long before the caller is told


class SchemaError(RuntimeError):
    """The database's schema cannot be used or changed as asked."""


@dataclass(frozen=True)
class UpgradeStep:
    """One ordered schema change: ``schemas/upgrades/NNNN_name.sql``."""

    version: int
    name: str
    statements: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.statements.encode()).hexdigest()


@cache
def upgrade_steps() -> tuple[UpgradeStep, ...]:
    """Every shipped upgrade step, in order."""
    steps = []
    for entry in resources.files("segue.schemas").joinpath("upgrades").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            steps.append(UpgradeStep(int(match[1]), match[2], entry.read_text()))
    steps.sort(key=lambda step: step.version)
    if [step.version for step in steps] != list(range(1, len(steps) + 1)):
        raise SchemaError(f"upgrade steps must be numbered 1, 2, … without gaps: {[s.version for s in steps]}")
    return tuple(steps)


def latest_schema_version() -> int:
    """The schema version this code needs."""
    return upgrade_steps()[-1].version


def vector_column(version: int) -> sql.Identifier:
    """The vector column of model version ``version``."""
    return sql.Identifier(f"embedding_v{version}")


def index_name(version: int) -> sql.Identifier:
    """The HNSW index on model version ``version``'s column."""
    return sql.Identifier(f"documents_embedding_v{version}_hnsw")


def sha_column(version: int) -> sql.Identifier:
    """The column holding the content hash that model version ``version``'s vector was built from."""
    return sql.Identifier(f"embedding_v{version}_sha256")


def _search_path(schema: str) -> sql.Composed:
    return sql.SQL("SELECT set_config('search_path', {}, false)").format(
        sql.Literal(sql.SQL(", ").join([sql.Identifier(schema), sql.Identifier("public")]).as_string(None))
    )


def connect(settings: Settings, url: str, *, read_only: bool = False) -> psycopg.Connection:
    """Open a connection with Segue's schema on the search_path and pgvector types registered.

    Autocommit: a statement never leaves an idle transaction holding locks that would
    block DDL (registering a model) or CREATE INDEX CONCURRENTLY; writes that belong
    together use ``with conn.transaction():``. A ``read_only`` session cannot write at all.
    """
    conn = psycopg.connect(url, autocommit=True)
    configure(conn, settings)
    if read_only:
        conn.execute("SET default_transaction_read_only = on")
    return conn


def configure(conn: psycopg.Connection, settings: Settings) -> None:
    """Put Segue's schema on a connection's search_path and register pgvector's types (pools use this too)."""
    conn.execute(_search_path(settings.db_schema))
    register_vector(conn)


def _connect_plain(settings: Settings, url: str) -> psycopg.Connection:
    """An autocommit connection with Segue's schema on the search_path (works before pgvector exists)."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(_search_path(settings.db_schema))
    return conn


async def connect_async(settings: Settings, url: str) -> psycopg.AsyncConnection:
    """The async twin of :func:`connect` (autocommit; use ``conn.transaction()`` blocks)."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(_search_path(settings.db_schema))
    await register_vector_async(conn)
    return conn


def schema_version(conn: psycopg.Connection) -> int:
    """The newest upgrade step applied to the database on the search path (0: none)."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def require_schema(settings: Settings, url: str) -> None:
    """Raise :class:`SchemaError` unless the database is at this code's schema version (reads only)."""
    with _connect_plain(settings, url) as conn:
        found = schema_version(conn)
    wanted = latest_schema_version()
    if found < wanted:
        what = "holds no Segue schema yet" if found == 0 else f"is at schema version {found}, this Segue needs {wanted}"
        raise SchemaError(f"the database {what}: run `segue db upgrade` (workers also upgrade it when they start)")
    if found > wanted:
        raise SchemaError(f"the database is at schema version {found}, newer than this Segue ({wanted}): upgrade Segue")


def run_ddl(conn: psycopg.Connection, work: Callable[[], T], *, what: str) -> T:
    """Run ``work()`` in a transaction whose locks wait at most ``DDL_LOCK_TIMEOUT_S``; retry on timeout.

    A DDL statement queued behind a long lock (CREATE INDEX CONCURRENTLY, a long
    transaction) would make every later write to the table queue behind it; with a lock
    timeout it steps aside and tries again, with backoff, for up to ``DDL_GIVE_UP_S``.
    Inside an outer transaction the work runs in a savepoint, retried the same way.
    """
    deadline = time.monotonic() + DDL_GIVE_UP_S
    delay = 0.5
    while True:
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(DDL_LOCK_TIMEOUT_S * 1000)}ms",))
                return work()
        except errors.LockNotAvailable:
            if time.monotonic() + delay > deadline:
                raise SchemaError(
                    f"{what}: a table stayed locked by another session for {DDL_GIVE_UP_S:.0f}s "
                    "(an index build or a long transaction?); try again later"
                ) from None
            log.warning("%s: waiting for a lock (another session holds it); retrying in %.1fs", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def upgrade(settings: Settings, url: str) -> list[str]:
    """Bring the database to this code's schema version; returns the steps applied (none if current).

    Needs the ``vector`` extension: created here when missing, which takes a role
    allowed to (an administrator can create it beforehand for a role that is not).
    """
    with _connect_plain(settings, url) as conn:
        current = schema_version(conn)
        if current == latest_schema_version():
            return []
        if current > latest_schema_version():
            raise SchemaError(
                f"the database is at schema version {current}, newer than this Segue ({latest_schema_version()})")
        with held(conn, Lock.SCHEMA):
            _create_prerequisites(conn, settings.db_schema)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = []
            for step in upgrade_steps()[schema_version(conn):]:
                run_ddl(conn, lambda step=step: _apply_step(conn, step), what=f"schema upgrade {step.version}")
                applied.append(f"{step.version:04d}_{step.name}")
                log.info("applied schema upgrade %04d_%s", step.version, step.name)
            run_ddl(conn, lambda: install_vector_counters(conn), what="installing the counter triggers")
            return applied


def _create_prerequisites(conn: psycopg.Connection, schema: str) -> None:
    """The ``vector`` extension and Segue's schema, created only when missing (no privilege needed otherwise)."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except errors.InsufficientPrivilege:
            raise SchemaError("the pgvector extension is not installed in this database and this role may not "
                              "create it: ask an administrator to run CREATE EXTENSION vector") from None
    if conn.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone()[0] is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def _apply_step(conn: psycopg.Connection, step: UpgradeStep) -> None:
    if conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (step.version,)).fetchone():
        return  # another process applied it first
    conn.execute(step.statements)
    conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                 (step.version, step.name, step.checksum))


def live_versions(conn: psycopg.Connection) -> list[int]:
    """Versions of the models that are not retired, oldest first."""
    rows = conn.execute("SELECT version FROM embedding_models WHERE state = 'live' ORDER BY version").fetchall()
    return [row[0] for row in rows]


def _signed_counts(rows: str, sign: int, versions: list[int]) -> sql.Composed:
    """Per-model (current, stale) contributions of a transition table, times ``sign``."""
    parts = [
        sql.SQL(
            "SELECT {v} AS model_version, {s} * count(*) FILTER (WHERE {h} = content_sha256) AS current,"
            " {s} * count(*) FILTER (WHERE {h} <> content_sha256) AS stale FROM {rows}"
        ).format(v=sql.Literal(v), s=sql.Literal(sign), h=sha_column(v), rows=sql.Identifier(rows))
        for v in versions
    ]
    return sql.SQL(" UNION ALL ").join(parts)


def _counter_body(sources: list[tuple[str, int]], versions: list[int]) -> sql.Composed:
    docs_delta = sql.SQL(" + ").join(
        sql.SQL("{} * (SELECT count(*) FROM {})").format(sql.Literal(sign), sql.Identifier(rows))
        for rows, sign in sources
    )
    statements = [sql.SQL("UPDATE corpus_counters SET documents = documents + {};").format(docs_delta)]
    if versions:
        deltas = sql.SQL(" UNION ALL ").join(_signed_counts(rows, sign, versions) for rows, sign in sources)
        statements.append(
            sql.SQL(
                "UPDATE vector_counters v SET current = v.current + d.current, stale = v.stale + d.stale"
                " FROM (SELECT model_version, sum(current) AS current, sum(stale) AS stale FROM ({deltas}) x"
                " GROUP BY model_version) d WHERE v.model_version = d.model_version;"
            ).format(deltas=deltas)
        )
    return sql.SQL(" ").join(statements)


_TRIGGER_SOURCES = {
    "INSERT": [("new_rows", 1)],
    "UPDATE": [("new_rows", 1), ("old_rows", -1)],
    "DELETE": [("old_rows", -1)],
}


def install_vector_counters(conn: psycopg.Connection) -> None:
    """(Re)generate the triggers that keep corpus_counters and vector_counters exact.

    Call inside the transaction that changes the set of live models or their columns.
    Only what differs from the database is written: a function whose body is unchanged
    is left alone, and a trigger is created only when missing (its function's name never
    changes), so no lock on ``documents`` is taken when nothing changed.
    """
    versions = live_versions(conn)
    for op, sources in _TRIGGER_SOURCES.items():
        name = f"segue_count_documents_{op.lower()}"
        body = sql.SQL("BEGIN {} RETURN NULL; END").format(_counter_body(sources, versions)).as_string(conn)
        existing = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)", (f"{name}()",)).fetchone()
        if existing is None or existing[0] != body:
            conn.execute(
                sql.SQL("CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS {body}").format(
                    f=sql.Identifier(name), body=sql.Literal(body))
            )
        trigger = f"documents_count_{op.lower()}"
        if conn.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = 'documents'::regclass AND tgname = %s",
                        (trigger,)).fetchone():
            continue
        referencing = sql.SQL(" ").join(
            sql.SQL("{} TABLE AS {}").format(
                sql.SQL("NEW" if rows == "new_rows" else "OLD"), sql.Identifier(rows)
            )
            for rows, _ in sources
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {t} AFTER {op} ON documents REFERENCING {ref}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
            ).format(t=sql.Identifier(trigger), op=sql.SQL(op), ref=referencing, f=sql.Identifier(name))
        )
