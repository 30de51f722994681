"""HNSW indexes on model columns: built concurrently once coverage allows, one builder at a time.

Workers try on a timer (:func:`build_when_covered`); ``segue migrate index`` builds on
demand (:func:`build`). ``maintenance_work_mem`` is set to the estimated need, up to a
cap; a failed build is dropped and recorded (``index_failed``), and workers stop after
``IndexPolicy.max_failures`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from segue.control import registry
from segue.control.migration import MigrationError, active_migration, coverage_pct
from segue.schemas.changelog import Action
from segue.storage import changelog, model_columns
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


class IndexWaits(MigrationError):
    """Coverage is below the policy's threshold: the index is not built yet."""


def index_failures(conn: psycopg.Connection, version: int) -> IndexFailures:
    """Failed HNSW builds of model ``version`` recorded in the changelog."""
    return IndexFailures(*changelog.index_failures(conn, version))


def describe(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> str:
    """One line on model ``version``'s HNSW index: built, building, waiting, or failing and why (reads only)."""
    name = model_columns.index_name(conn, version).as_string(conn)
    valid = model_columns.index_valid(conn, version)
    failures = index_failures(conn, version)
    if valid:
        return f"{name} is built"
    if valid is not None:
        state = f"{name} is being built (or was interrupted)"
    else:
        covered = coverage_pct(conn, version)
        active = active_migration(conn)
        if covered < policy.min_coverage_pct:
            state = f"{name} waits for {policy.min_coverage_pct:g}% coverage (now {covered:.1f}%)"
        elif failures.stopped(policy):
            state = f"{name} is not built (coverage {covered:.1f}%)"
        elif active is not None and active.state == "paused" and active.to_version == version:
            state = (f"{name} is not built: coverage {covered:.1f}% is enough, but workers build no index while the "
                     "migration is paused (segue migrate resume, or build it now: segue migrate index)")
        else:
            state = (f"{name} is not built yet: coverage {covered:.1f}% is enough, and a worker builds it within "
                     "SEGUE_SWEEPER_INTERVAL_S (or build it now: segue migrate index)")
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
        try:
            built, message = _build_locked(conn, active.to_version, policy)
        except IndexWaits:
            return None
        return message if built else None


def build(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> tuple[bool, str]:
    """CREATE INDEX CONCURRENTLY an HNSW index on a model's column once coverage allows.

    Waits for any other builder; runs outside a transaction (connections from ``connections.connect``
    autocommit). Tries even after workers gave up. Returns (built, message): not built when the
    index exists already; below the policy's coverage it raises :class:`IndexWaits`.
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
    name = model_columns.index_name(conn, version).as_string(conn)
    valid = model_columns.index_valid(conn, version)
    if valid:
        return False, f"the HNSW index {name} already exists"
    if valid is not None:  # left invalid by an interrupted concurrent build
        model_columns.drop_index_concurrently(conn, version)
    covered = coverage_pct(conn, version)
    if covered < policy.min_coverage_pct:
        raise IndexWaits(f"coverage of {spec.name} is {covered:.2f}% < {policy.min_coverage_pct:g}%: the HNSW index "
                         "waits, not built (built now, it would take every later vector one insert at a time); "
                         "build it anyway: segue migrate index --now")
    rows = model_columns.indexed_rows(conn, version)
    memory_mb = build_memory_mb(rows, spec.dim, policy)
    settings = {"m": policy.m, "ef_construction": policy.ef_construction, "maintenance_work_mem_mb": memory_mb,
                "coverage_pct": round(covered, 3)}
    try:
        model_columns.create_index(conn, version, m=policy.m, ef_construction=policy.ef_construction,
                                   memory_mb=memory_mb)
    except psycopg.Error as error:
        if conn.broken or is_transient(error):  # the database, not the build, failed: not counted
            raise
        model_columns.drop_index_concurrently(conn, version)
        changelog.log_control(conn, Action.INDEX_FAILED, model_version=version, detail=settings,
                              error=f"{type(error).__name__}: {error}")
        raise MigrationError(f"building the HNSW index {name} failed: {error} ("
                             f"{index_failures(conn, version).describe(policy)})") from error
    changelog.log_control(conn, Action.INDEX_BUILT, model_version=version, detail=settings)
    return True, (f"HNSW index {name} (m={policy.m}, ef_construction={policy.ef_construction}) "
                  f"built with maintenance_work_mem={memory_mb}MB for {rows} rows × {spec.dim}-d")
