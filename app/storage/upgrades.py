"""Versioned schema upgrades: ordered table changes applied once each, views and functions applied again when they
change; under an advisory lock, with short lock waits.

Tables change in ordered upgrade steps (``schemas/upgrades/NNNN_name.sql``), frozen once
shipped; ``schema_migrations`` records the ones applied. Views and functions are declared
whole in ``schemas/idempotent/NN_name.sql``, each safe to run again; ``schema_idempotent``
records the checksum of each as last applied. :func:`upgrade` applies the missing steps,
then every idempotent file if a step ran, else those whose checksum changed, each in its
own transaction with a short lock timeout (retried), under an advisory lock; on an
up-to-date database it does nothing at all: no DDL, no lock.
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
from psycopg import errors, sql

from segue.settings import Settings
from segue.storage.connections import connect_plain
from segue.storage.locks import Lock, held
from segue.storage.model_columns import install_vector_counters

log = logging.getLogger("segue.storage.upgrades")

T = TypeVar("T")

DDL_LOCK_TIMEOUT_S = 2.0  # a DDL statement waits this long for its lock, then lets queued writes through
DDL_GIVE_UP_S = 300.0  # and is retried with backoff for this long before the caller is told


class SchemaError(RuntimeError):
    """The database's schema cannot be used or changed as asked."""


@dataclass(frozen=True)
class SqlFile:
    """One file of SQL statements shipped in ``schemas/``, named and checksummed as the database records it."""

    name: str
    statements: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.statements.encode()).hexdigest()


@dataclass(frozen=True)
class UpgradeStep(SqlFile):
    """One ordered schema change: ``schemas/upgrades/NNNN_name.sql``."""

    version: int


class Definition(SqlFile):
    """Views or functions declared whole, safe to apply again: ``schemas/idempotent/NN_name.sql``."""


@cache
def upgrade_steps() -> tuple[UpgradeStep, ...]:
    """Every shipped upgrade step, in order."""
    steps = []
    for entry in resources.files("segue.schemas").joinpath("upgrades").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            steps.append(UpgradeStep(name=match[2], statements=entry.read_text(), version=int(match[1])))
    steps.sort(key=lambda step: step.version)
    if [step.version for step in steps] != list(range(1, len(steps) + 1)):
        raise SchemaError(f"upgrade steps must be numbered 1, 2, … without gaps: {[s.version for s in steps]}")
    return tuple(steps)


@cache
def definitions() -> tuple[Definition, ...]:
    """Every idempotent file, in the order they apply (by name)."""
    files = resources.files("segue.schemas").joinpath("idempotent").iterdir()
    return tuple(sorted((Definition(f.name, f.read_text()) for f in files if re.fullmatch(r"\d{2}_\w+\.sql", f.name)),
                        key=lambda definition: definition.name))


def latest_schema_version() -> int:
    """The schema version this code needs."""
    return upgrade_steps()[-1].version


def schema_version(conn: psycopg.Connection) -> int:
    """The newest upgrade step applied to the database on the search path (0: none)."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def stale_definitions(conn: psycopg.Connection) -> list[Definition]:
    """The idempotent files whose checksum differs from the one last applied to the database (all, before any was)."""
    applied: dict[str, str] = {}
    if conn.execute("SELECT to_regclass('schema_idempotent')").fetchone()[0] is not None:
        applied = dict(conn.execute("SELECT name, checksum FROM schema_idempotent").fetchall())
    return [d for d in definitions() if applied.get(d.name) != d.checksum]


def require_schema(settings: Settings, url: str) -> None:
    """Raise :class:`SchemaError` unless the database is at this code's schema version (reads only)."""
    with connect_plain(settings, url) as conn:
        found = schema_version(conn)
        stale = stale_definitions(conn) if found else []
    wanted = latest_schema_version()
    upgrade_it = "run `segue db upgrade` (workers also upgrade it when they start)"
    if found < wanted:
        what = "holds no Segue schema yet" if found == 0 else f"is at schema version {found}, this Segue needs {wanted}"
        raise SchemaError(f"the database {what}: {upgrade_it}")
    if found > wanted:
        raise SchemaError(f"the database is at schema version {found}, newer than this Segue ({wanted}): upgrade Segue")
    if stale:
        raise SchemaError(f"the database's views and functions are not this Segue's ({', '.join(d.name for d in stale)}):"
                          f" {upgrade_it}")


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
    """Bring the database to this code's schema; returns the steps and idempotent files applied (none if current).

    Needs the ``vector`` extension: created here when missing, which takes a role
    allowed to (an administrator can create it beforehand for a role that is not).
    """
    with connect_plain(settings, url) as conn:
        current = schema_version(conn)
        if current > latest_schema_version():
            raise SchemaError(
                f"the database is at schema version {current}, newer than this Segue ({latest_schema_version()})")
        if current == latest_schema_version() and not stale_definitions(conn):
            return []
        with held(conn, Lock.SCHEMA):
            _create_prerequisites(conn, settings.db_schema)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_idempotent (name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = []
            for step in upgrade_steps()[schema_version(conn):]:
                run_ddl(conn, lambda step=step: _apply_step(conn, step), what=f"schema upgrade {step.version}")
                applied.append(f"{step.version:04d}_{step.name}")
                log.info("applied schema upgrade %04d_%s", step.version, step.name)
            # After a step, all of them: a step may have dropped what a view or a function used.
            for definition in definitions() if applied else stale_definitions(conn):
                run_ddl(conn, lambda definition=definition: _apply_definition(conn, definition),
                        what=f"applying idempotent/{definition.name}")
                applied.append(f"idempotent/{definition.name}")
                log.info("applied idempotent/%s", definition.name)
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


def _apply_definition(conn: psycopg.Connection, definition: Definition) -> None:
    conn.execute(definition.statements)
    conn.execute("INSERT INTO schema_idempotent (name, checksum) VALUES (%s, %s) ON CONFLICT (name)"
                 " DO UPDATE SET checksum = excluded.checksum, applied_at = now()",
                 (definition.name, definition.checksum))
