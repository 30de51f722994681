"""Migration control: start, pause, resume, the cutover gate, rollback, finish, the HNSW index.

Every transition is one transaction that updates ``migrations``, flips ``serving``
where reads move, and appends a ``control`` row to ``migration_changelog``.

    running ⇄ paused
    running → ready            (coverage and the latest quality verdict pass)
    running | ready | rolled_back → cut_over   (gated; --force with a reason bypasses)
    cut_over → rolled_back     (reads back on the old model; dual-write continues)
    cut_over → finished        (after the grace period: the old model is retired)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app import db, registry
from app.isolation import is_transient

ACTIVE = ("running", "paused", "ready", "cut_over", "rolled_back")


class MigrationError(RuntimeError):
    """A migration request that the current state does not allow."""


@dataclass(frozen=True)
class Migration:
    id: int
    from_version: int
    to_version: int
    from_name: str
    to_name: str
    state: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    cut_over_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Gate:
    """Whether a cutover may happen now, and why not."""

    coverage_pct: float
    min_coverage_pct: float
    verdict: str | None
    verdict_metric: str | None

    @property
    def coverage_ok(self) -> bool:
        return self.coverage_pct >= self.min_coverage_pct

    @property
    def quality_ok(self) -> bool:
        return self.verdict == "pass"

    @property
    def passed(self) -> bool:
        return self.coverage_ok and self.quality_ok

    def reasons(self) -> list[str]:
        """Why the gate is closed (empty when it is open)."""
        why = []
        if not self.coverage_ok:
            why.append(f"coverage {self.coverage_pct:.2f}% is below {self.min_coverage_pct:.2f}%")
        if self.verdict is None:
            why.append("no quality verdict is recorded for this migration (model_evaluations)")
        elif not self.quality_ok:
            why.append(f"the latest quality verdict ({self.verdict_metric}) is {self.verdict}")
        return why


_SELECT = (
    "SELECT g.*, f.name AS from_name, t.name AS to_name FROM migrations g"
    " JOIN embedding_models f ON f.version = g.from_version JOIN embedding_models t ON t.version = g.to_version"
)


def _migration(row: dict) -> Migration:
    return Migration(**{k: row[k] for k in Migration.__dataclass_fields__})


def active_migration(conn: psycopg.Connection) -> Migration | None:
    """The migration that is not finished, if any."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_SELECT + " WHERE g.state <> 'finished'").fetchone()
    return _migration(row) if row else None


def get_migration(conn: psycopg.Connection, migration_id: int) -> Migration:
    """A migration by id."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_SELECT + " WHERE g.id = %s", (migration_id,)).fetchone()
    if row is None:
        raise MigrationError(f"no migration {migration_id}")
    return _migration(row)


def require_active(conn: psycopg.Connection) -> Migration:
    """The active migration, or a clear error."""
    migration = active_migration(conn)
    if migration is None:
        raise MigrationError("no migration is in progress (start one with: segue migrate start --to NEW)")
    return migration


def _log(conn: psycopg.Connection, migration: Migration, action: str, detail: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO migration_changelog (model_version, action, origin, event_id, detail)"
        " VALUES (%s, %s, 'control', %s, %s)",
        (migration.to_version, action, f"migration-{migration.id}",
         Jsonb({"migration_id": migration.id, "from": migration.from_name, "to": migration.to_name, **detail})),
    )


def _transition(
    conn: psycopg.Connection,
    allowed: tuple[str, ...],
    state: str,
    action: str,
    detail: dict[str, Any] | None = None,
    *,
    read_version: str | None = None,
) -> Migration:
    """Move the active migration from one of ``allowed`` to ``state`` in one transaction."""
    with conn.transaction():
        migration = require_active(conn)
        conn.execute("SELECT 1 FROM migrations WHERE id = %s FOR UPDATE", (migration.id,))
        migration = require_active(conn)
        if migration.state not in allowed:
            raise MigrationError(
                f"migration {migration.id} is {migration.state}; this needs it to be {' or '.join(allowed)}"
            )
        conn.execute(
            "UPDATE migrations SET state = %s, updated_at = now(),"
            " cut_over_at = CASE WHEN %s = 'cut_over' THEN now() ELSE cut_over_at END,"
            " finished_at = CASE WHEN %s = 'finished' THEN now() ELSE finished_at END WHERE id = %s",
            (state, state, state, migration.id),
        )
        if read_version is not None:
            version = getattr(migration, read_version)
            conn.execute("UPDATE serving SET read_model_version = %s, updated_at = now()", (version,))
        _log(conn, migration, action, {"previous_state": migration.state, **(detail or {})})
    return get_migration(conn, migration.id)


def ensure_none_active(conn: psycopg.Connection) -> None:
    """Raise unless no migration is in progress (one migration at a time)."""
    current = active_migration(conn)
    if current is not None:
        raise MigrationError(
            f"migration {current.id} ({current.from_name} → {current.to_name}) is {current.state}; "
            "one migration at a time: finish it first"
        )


def start(conn: psycopg.Connection, to_name: str, from_name: str | None = None,
          settings: dict[str, Any] | None = None) -> Migration:
    """Record a migration to ``to_name`` (registered, live) from ``from_name`` (default: the read model)."""
    to = registry.get_model(conn, to_name)
    if to.state != "live":
        raise MigrationError(f"model {to_name!r} is {to.state}; register a new one")
    if from_name is None:
        source = next((m for m in registry.list_models(conn) if m.serving_reads), None)
        if source is None:
            raise MigrationError("no model serves reads yet; register one first")
    else:
        source = registry.get_model(conn, from_name)
    if source.spec.version == to.spec.version:
        raise MigrationError(f"{to_name!r} already serves reads; migrate to another model")
    try:
        with conn.transaction():
            (migration_id,) = conn.execute(
                "INSERT INTO migrations (from_version, to_version, state, settings) VALUES (%s, %s, 'running', %s)"
                " RETURNING id",
                (source.spec.version, to.spec.version, Jsonb(settings or {})),
            ).fetchone()
            migration = require_active(conn)
            _log(conn, migration, "migration_started", {"settings": settings or {}})
    except errors.UniqueViolation:
        ensure_none_active(conn)
        raise
    return migration


def pause(conn: psycopg.Connection) -> Migration:
    """Pause the backfill (changes keep being dual-written)."""
    return _transition(conn, ("running", "ready"), "paused", "migration_paused")


def resume(conn: psycopg.Connection) -> Migration:
    """Resume a paused migration."""
    return _transition(conn, ("paused",), "running", "migration_resumed")


def vector_counts(conn: psycopg.Connection, version: int) -> tuple[int, int]:
    """(current vectors of model ``version``, documents), from the exact counters."""
    row = conn.execute(
        "SELECT v.current, c.documents FROM vector_counters v CROSS JOIN corpus_counters c WHERE v.model_version = %s",
        (version,),
    ).fetchone()
    if row is None:
        raise MigrationError(f"model version {version} has no vector counters (retired?)")
    return row


def coverage_pct(conn: psycopg.Connection, version: int) -> float:
    """Percentage of documents whose vector for ``version`` is current (from the counters)."""
    current, total = vector_counts(conn, version)
    return 100.0 if total == 0 else 100.0 * current / total


def gate(conn: psycopg.Connection, migration: Migration, min_coverage_pct: float) -> Gate:
    """Evaluate the cutover gate: coverage of the new model and the latest quality verdict."""
    verdict = conn.execute(
        "SELECT verdict, metric FROM model_evaluations WHERE migration_id = %s ORDER BY evaluated_at DESC, id DESC"
        " LIMIT 1",
        (migration.id,),
    ).fetchone()
    return Gate(
        coverage_pct=coverage_pct(conn, migration.to_version),
        min_coverage_pct=min_coverage_pct,
        verdict=verdict[0] if verdict else None,
        verdict_metric=verdict[1] if verdict else None,
    )


def record_evaluation(conn: psycopg.Connection, migration_id: int, metric: str, old_value: float,
                      new_value: float, *, higher_is_better: bool = True, detail: dict | None = None) -> str:
    """Record a quality check of the new model against the old one; returns its verdict."""
    better = new_value >= old_value if higher_is_better else new_value <= old_value
    verdict = "pass" if better else "fail"
    with conn.transaction():
        conn.execute(
            "INSERT INTO model_evaluations (migration_id, metric, old_value, new_value, verdict, detail)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (migration_id, metric, old_value, new_value, verdict, Jsonb(detail or {})),
        )
    return verdict


def refresh(conn: psycopg.Connection, min_coverage_pct: float) -> Migration | None:
    """Mark a running migration ready once its gate passes; returns the active migration."""
    migration = active_migration(conn)
    if migration is None or migration.state != "running":
        return migration
    check = gate(conn, migration, min_coverage_pct)
    if not check.passed:
        return migration
    return _transition(conn, ("running",), "ready", "migration_ready", {"coverage_pct": check.coverage_pct})


def cutover(conn: psycopg.Connection, *, min_coverage_pct: float, force_reason: str | None = None) -> Migration:
    """Switch reads to the new model, atomically, if the gate passes (or is forced with a reason)."""
    migration = require_active(conn)
    check = gate(conn, migration, min_coverage_pct)
    if not check.passed and not force_reason:
        raise MigrationError("cutover refused: " + "; ".join(check.reasons()) + " (override: --force --reason TEXT)")
    detail = {"coverage_pct": round(check.coverage_pct, 3), "verdict": check.verdict}
    if not check.passed:
        detail.update(forced=True, reason=force_reason, gate_failures=check.reasons())
    return _transition(conn, ("running", "ready", "rolled_back"), "cut_over", "migration_cut_over", detail,
                       read_version="to_version")


def rollback(conn: psycopg.Connection) -> Migration:
    """Switch reads back to the old model; both are still dual-written."""
    return _transition(conn, ("cut_over",), "rolled_back", "migration_rolled_back", read_version="from_version")


def finish(conn: psycopg.Connection, *, grace: timedelta) -> Migration:
    """Retire the old model after the grace period: stop writing it, drop its index and columns."""
    migration = require_active(conn)
    if migration.state != "cut_over":
        raise MigrationError(f"migration {migration.id} is {migration.state}; finish needs cut_over")
    waited = conn.execute("SELECT now() - %s::timestamptz", (migration.cut_over_at,)).fetchone()[0]
    if waited < grace:
        raise MigrationError(
            f"reads moved to {migration.to_name} {waited} ago; the grace period is {grace} "
            f"(rollback stays possible until then)"
        )
    old = migration.from_version

    def retire() -> Migration:
        conn.execute("UPDATE embedding_models SET state = 'retired', retired_at = now() WHERE version = %s", (old,))
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index_name(old)))
        conn.execute(sql.SQL("ALTER TABLE documents DROP COLUMN IF EXISTS {}, DROP COLUMN IF EXISTS {}").format(
            db.vector_column(old), db.sha_column(old)))
        conn.execute("DELETE FROM vector_counters WHERE model_version = %s", (old,))
        db.install_vector_counters(conn)
        return _transition(conn, ("cut_over",), "finished", "migration_finished", {"retired": migration.from_name})

    return db.run_ddl(conn, retire, what=f"retiring model {migration.from_name!r}")


def index_name(version: int) -> sql.Identifier:
    """The HNSW index of model version ``version``'s column."""
    return sql.Identifier(f"documents_embedding_v{version}_hnsw")


def hnsw_memory_bytes(rows: int, dim: int) -> int:
    """Rough HNSW build memory: rows × (4·dim + 8) × 1.3."""
    return int(rows * (4 * dim + 8) * 1.3)


INDEX_LOCK = 0x5E70  # advisory lock: one index build at a time across workers


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
        " WHERE action = 'index_failed' AND model_version = %s",
        (version,),
    ).fetchone()
    return IndexFailures(count, last_error)


def index_status(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> str:
    """One line on model ``version``'s HNSW index: built, building, waiting, or failing and why."""
    name = index_name(version).as_string(conn)
    valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    failures = index_failures(conn, version)
    if valid is not None and valid[0]:
        return f"{name} is built"
    state = (f"{name} is being built (or was interrupted)" if valid is not None
             else f"{name} waits for {policy.min_coverage_pct:g}% coverage")
    return state if failures.count == 0 else f"{state}; {failures.describe(policy)}"


def build_index_when_covered(conn: psycopg.Connection, policy: IndexPolicy) -> str | None:
    """Build the active migration's HNSW index once its coverage allows; what was done, if anything.

    Workers call this periodically; the advisory lock keeps it to one builder at a time,
    and they stop after ``policy.max_failures`` failed builds (each logged as ``index_failed``).
    """
    active = active_migration(conn)
    if active is None or active.state == "paused":
        return None
    if index_failures(conn, active.to_version).stopped(policy):
        return None
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (INDEX_LOCK,)).fetchone()[0]:
        return None
    try:
        built, message = _build_index_locked(conn, active.to_version, policy)
        return message if built else None
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (INDEX_LOCK,))


def build_index(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> tuple[bool, str]:
    """CREATE INDEX CONCURRENTLY an HNSW index on a model's column once coverage allows.

    Waits for any other builder; runs outside a transaction (connections from ``db.connect``
    autocommit). Tries even after workers gave up. Returns (built, message).
    """
    conn.execute("SELECT pg_advisory_lock(%s)", (INDEX_LOCK,))
    try:
        return _build_index_locked(conn, version, policy)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (INDEX_LOCK,))


def index_memory_mb(rows: int, dim: int, policy: IndexPolicy) -> int:
    """The maintenance_work_mem for a build: the estimate, at least 64 MB, at most the policy's cap."""
    return min(max(64, -(-hnsw_memory_bytes(rows, dim) // 2**20)), policy.max_memory_mb)


def _build_index_locked(conn: psycopg.Connection, version: int, policy: IndexPolicy) -> tuple[bool, str]:
    spec = next((s for s in registry.live_models(conn) if s.version == version), None)
    if spec is None:
        raise MigrationError(f"model version {version} is not live")
    name = index_name(version).as_string(conn)
    valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    if valid is not None and valid[0]:
        return False, f"the HNSW index {name} already exists"
    if valid is not None:  # left invalid by an interrupted concurrent build
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index_name(version)))
    covered = coverage_pct(conn, version)
    if covered < policy.min_coverage_pct:
        return False, (f"coverage {covered:.2f}% < {policy.min_coverage_pct:.2f}%: the index waits "
                       "(it would be built on a moving target)")
    (rows,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
    memory_mb = index_memory_mb(rows, spec.dim, policy)
    settings = {"m": policy.m, "ef_construction": policy.ef_construction, "maintenance_work_mem_mb": memory_mb,
                "coverage_pct": round(covered, 3)}
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory_mb}MB")))
    try:
        conn.execute(
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON documents USING hnsw ({} vector_cosine_ops)"
                " WITH (m = {}, ef_construction = {})"
            ).format(index_name(version), db.vector_column(version), sql.Literal(policy.m),
                     sql.Literal(policy.ef_construction))
        )
    except psycopg.Error as error:
        if conn.broken or is_transient(error):  # the database, not the build, failed: not counted
            raise
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index_name(version)))
        conn.execute(
            "INSERT INTO migration_changelog (model_version, action, origin, error, detail)"
            " VALUES (%s, 'index_failed', 'control', %s, %s)",
            (version, f"{type(error).__name__}: {error}"[:4000], Jsonb(settings)),
        )
        raise MigrationError(f"building the HNSW index {name} failed: {error} ("
                             f"{index_failures(conn, version).describe(policy)})") from error
    conn.execute(
        "INSERT INTO migration_changelog (model_version, action, origin, detail) VALUES (%s, 'index_built', 'control', %s)",
        (version, Jsonb(settings)),
    )
    return True, (f"HNSW index {name} (m={policy.m}, ef_construction={policy.ef_construction}) "
                  f"built with maintenance_work_mem={memory_mb}MB for {rows} rows × {spec.dim}-d")
