"""HNSW indexes on model columns: built concurrently once coverage allows, one builder at a time.

Workers try on a timer (:func:`build_when_covered`); ``segue migrate index`` builds on
demand (:func:`build`). ``maintenance_work_mem`` is set to the estimated need, up to a
cap; a failed build is dropped and recorded (``index_failed``), and workers stop after
``IndexPolicy.max_failures`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from segue.control import registry
from segue.control.migration import MigrationError, active_migration, coverage_pct
from segue.schemas.changelog import Action, Origin
from segue.storage import model_columns
from segue.storage.locks import Lock, held, held_if_free
from segue.worker.isolation import is_transient


def hnsw_memory_bytes(rows: int, dim: int) -> int:
    """Rough HNSW build memory: rows × (4·dim + 8) × 1.3."""
    return int(rows * (4 * dim + 8) * 1.3)


@dataclass(frozen=True)
class IndexPolicy:
    """How HNSW indexes are built: graph settings, the coverage to wait for, memory cap, failures allowed."""

    min_coverage_pct: float
    m: int
    ef_construction: int
    max_memory_mb: int
    max_failures: int

    @classmethod
    def from_settings(cls, settings) -> IndexPolicy:
        return cls(min_coverage_pct=settings.index_min_coverage_pct, m=settings.hnsw_m,
                   ef_construction=settings.hnsw_ef_construction,
                   max_memory_mb=settings.index_max_maintenance_work_mem_mb,
                   max_failures=settings.index_max_failures)


@dataclass(frozen=True)
class IndexFailures:
    """Failed builds of one model's index: how many, and the last error."""

    count: int
    last_error: str | None

    def stopped(self, policy: IndexPolicy) -> bool:
        """Whether workers have given up building it (``segue migrate index`` still tries)."""
        return self.count >= policy.max_failures

    def describe(self, policy: IndexPolicy) -> str:
        head = f"{self.count} failed build(s)"
        if self.stopped(policy):
            head += (f"; workers stopped trying after {policy.max_failures}"
                     " (fix the cause, then run segue migrate index)")
        return f"{head}; last error: {self.last_error}"


def index_failures(conn: psycopg.Connection, version: int) -> IndexFailures:
    """Failed HNSW builds of model ``version`` recorded in the changelog."""
    count, last_error = conn.execute(
        "SELECT count(*), (array_agg(error ORDER BY id DESC))[1] FROM migration_changelog"
        " WHERE action = %s AND model_version = %s",
        (Action.INDEX_FAILED.value, version),
    ).fetchone()
    return IndexFailures(count, last_error)


def describe(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> str:
    """One line on model ``version``'s HNSW index: built, building, waiting, or failing and why (reads only)."""
    name = model_columns.index_name(version).as_string(conn)
    valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    failures = index_failures(conn, version)
    if valid is not None and valid[0]:
        return f"{name} is built"
    state = (f"{name} is being built (or was interrupted)" if valid is not None
             else f"{name} waits for {policy.min_coverage_pct:g}% coverage")
    return state if failures.count == 0 else f"{state}; {failures.describe(policy)}"


def build_when_covered(conn: psycopg.Connection, policy: IndexPolicy) -> str | None:
    """Build the active migration's HNSW index once its coverage allows; what was done, if anything.

    Workers call this periodically; the advisory lock keeps it to one builder at a time,
    and they stop after ``policy.max_failures`` failed builds (each logged as ``index_failed``).
    """
    active = active_migration(conn)
    if active is None or active.state == "paused":
        return None
    if index_failures(conn, active.to_version).stopped(policy):
        return None
    with held_if_free(conn, Lock.INDEX_BUILD) as mine:
        if not mine:
            return None
        built, message = _build_locked(conn, active.to_version, policy)
        return message if built else None


def build(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> tuple[bool, str]:
    """CREATE INDEX CONCURRENTLY an HNSW index on a model's column once coverage allows.

    Waits for any other builder; runs outside a transaction (connections from ``connections.connect``
    autocommit). Tries even after workers gave up. Returns (built, message).
    """
    with held(conn, Lock.INDEX_BUILD):
        return _build_locked(conn, version, policy)


def build_memory_mb(rows: int, dim: int, policy: IndexPolicy) -> int:
    """The maintenance_work_mem for a build: the estimate, at least 64 MB, at most the policy's cap."""
    return min(max(64, -(-hnsw_memory_bytes(rows, dim) // 2**20)), policy.max_memory_mb)


def _build_locked(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> tuple[bool, str]:
    spec = next((s for s in registry.live_models(conn) if s.version == version), None)
    if spec is None:
        raise MigrationError(f"model version {version} is not live")
    name = model_columns.index_name(version).as_string(conn)
    valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    if valid is not None and valid[0]:
        return False, f"the HNSW index {name} already exists"
    if valid is not None:  # left invalid by an interrupted concurrent build
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(model_columns.index_name(version)))
    covered = coverage_pct(conn, version)
    if covered < policy.min_coverage_pct:
        return False, (f"coverage {covered:.2f}% < {policy.min_coverage_pct:.2f}%: the index waits "
                       "(it would be built on a moving target)")
    (rows,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
    memory_mb = build_memory_mb(rows, spec.dim, policy)
    settings = {"m": policy.m, "ef_construction": policy.ef_construction, "maintenance_work_mem_mb": memory_mb,
                "coverage_pct": round(covered, 3)}
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory_mb}MB")))
    try:
        conn.execute(
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON documents USING hnsw ({} vector_cosine_ops)"
                " WITH (m = {}, ef_construction = {})"
            ).format(model_columns.index_name(version), model_columns.vector_column(version), sql.Literal(policy.m),
                     sql.Literal(policy.ef_construction))
        )
    except psycopg.Error as error:
        if conn.broken or is_transient(error):  # the database, not the build, failed: not counted
            raise
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(model_columns.index_name(version)))
        conn.execute(
            "INSERT INTO migration_changelog (model_version, action, origin, error, detail) VALUES (%s, %s, %s, %s, %s)",
            (version, Action.INDEX_FAILED.value, Origin.CONTROL.value, f"{type(error).__name__}: {error}"[:4000],
             Jsonb(settings)),
        )
        raise MigrationError(f"building the HNSW index {name} failed: {error} ("
                             f"{index_failures(conn, version).describe(policy)})") from error
    conn.execute(
        "INSERT INTO migration_changelog (model_version, action, origin, detail) VALUES (%s, %s, %s, %s)",
        (version, Action.INDEX_BUILT.value, Origin.CONTROL.value, Jsonb(settings)),
    )
    return True, (f"HNSW index {name} (m={policy.m}, ef_construction={policy.ef_construction}) "
                  f"built with maintenance_work_mem={memory_mb}MB for {rows} rows × {spec.dim}-d")
