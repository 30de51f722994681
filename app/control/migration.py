"""The migration lifecycle: start, pause, resume, the cutover gate, cutover, rollback, finish, abort.

Every transition is one transaction that updates ``migrations``, flips ``serving``
where reads move, and appends a ``control`` row to ``migration_changelog``. The gate
uses the coverage threshold recorded when the migration started.

    running ⇄ paused
    running → ready            (coverage and the latest quality verdict pass)
    running | ready | rolled_back → cut_over   (gated; --force with a reason bypasses)
    cut_over → rolled_back     (reads back on the old model; dual-write continues)
    cut_over → finished        (after the grace period: the old model is retired)
    running | paused | ready | rolled_back → aborted   (the new model is retired)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors

from segue.control import bridging, registry
from segue.schemas.changelog import Action
from segue.storage import changelog, migrations, model_columns, upgrades
from segue.storage import registry as storage_registry

ACTIVE = ("running", "paused", "ready", "cut_over", "rolled_back")
ABORTABLE = ("running", "paused", "ready", "rolled_back")  # every state where reads do not use the new model


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

    @property
    def cutover_min_coverage_pct(self) -> float:
        """The coverage the cutover gate waits for, as recorded at start (100 for older migrations)."""
        return float(self.settings.get("cutover_min_coverage_pct", 100.0))


@dataclass(frozen=True)
class Gate:
    """Whether a cutover may happen now, and why not."""

    coverage_pct: float
    min_coverage_pct: float
    verdict: str | None
    verdict_metric: str | None
    verdict_coverage_pct: float | None  # the new model's coverage when the verdict was reached
    verdict_bridged: dict | None = None  # the adapter a bridged verdict judged readers through (segue eval --bridged)
    bridge_refusal: str | None = None  # why readers may not bridge now (a bridged verdict counts only while they may)

    @property
    def bridged_pass(self) -> bool:
        """A bridged verdict passed, and readers may still bridge: they are served as they were judged."""
        return self.verdict == "pass" and self.verdict_bridged is not None and self.bridge_refusal is None

    @property
    def coverage_ok(self) -> bool:
        return self.coverage_pct >= self.min_coverage_pct or self.bridged_pass

    @property
    def quality_ok(self) -> bool:
        reached = self.verdict_coverage_pct or 0.0
        return self.verdict == "pass" and (self.bridged_pass or reached >= self.min_coverage_pct)

    @property
    def passed(self) -> bool:
        return self.coverage_ok and self.quality_ok

    def reasons(self) -> list[str]:
        """Why the gate is closed (empty when it is open)."""
        why = []
        if not self.coverage_ok:
            why.append(f"coverage {self.coverage_pct:.2f}% is below {self.min_coverage_pct:.2f}%")
            if self.verdict_bridged is not None and self.bridge_refusal is not None:
                why.append(f"the bridged verdict no longer counts: {self.bridge_refusal}")
        if self.verdict is None:
            why.append("no quality verdict is recorded for this migration (run segue eval)")
        elif self.verdict != "pass":
            why.append(f"the latest quality verdict ({self.verdict_metric}) is {self.verdict}")
        elif not self.quality_ok:
            why.append(f"the latest verdict was reached at {self.verdict_coverage_pct or 0:.2f}% coverage, below "
                       f"{self.min_coverage_pct:.2f}%: run segue eval again")
        return why


def _migration(row: dict) -> Migration:
    return Migration(**{k: row[k] for k in Migration.__dataclass_fields__})


def active_migration(conn: psycopg.Connection) -> Migration | None:
    """The migration that has not ended (finished or aborted), if any."""
    row = migrations.active(conn)
    return _migration(row) if row else None


def get_migration(conn: psycopg.Connection, migration_id: int) -> Migration:
    """A migration by id."""
    row = migrations.get(conn, migration_id)
    if row is None:
        raise MigrationError(f"no migration {migration_id}")
    return _migration(row)


def require_active(conn: psycopg.Connection) -> Migration:
    """The active migration, or a clear error."""
    migration = active_migration(conn)
    if migration is None:
        raise MigrationError("no migration is in progress (start one with: segue migrate start --to NEW)")
    return migration


def _log(conn: psycopg.Connection, migration: Migration, action: Action, detail: dict[str, Any]) -> None:
    changelog.log_control(conn, action, model_version=migration.to_version, event_id=f"migration-{migration.id}",
                          detail={"migration_id": migration.id, "from": migration.from_name, "to": migration.to_name,
                                  **detail})


def _transition(
    conn: psycopg.Connection,
    allowed: tuple[str, ...],
    state: str,
    action: Action,
    detail: dict[str, Any] | None = None,
    *,
    read_version: str | None = None,
    check: Callable[[Migration], dict[str, Any]] | None = None,
) -> Migration:
    """Move the active migration from one of ``allowed`` to ``state`` in one transaction.

    ``check`` runs once the migration row is locked, so nothing it reads (a verdict, a state) can change before
    the transition commits: it raises :class:`MigrationError` to refuse, or returns more detail to log.
    """
    with conn.transaction():
        migration = require_active(conn)
        migrations.lock(conn, migration.id)
        migration = require_active(conn)
        if migration.state not in allowed:
            raise MigrationError(
                f"migration {migration.id} is {migration.state}; this needs it to be {' or '.join(allowed)}"
            )
        if check is not None:
            detail = {**(detail or {}), **check(migration)}
        migrations.set_state(conn, migration.id, state)
        if read_version is not None:
            storage_registry.serve_reads(conn, getattr(migration, read_version))
        _log(conn, migration, action, {"previous_state": migration.state, **(detail or {})})
    return get_migration(conn, migration.id)


def ensure_none_active(conn: psycopg.Connection) -> None:
    """Raise unless no migration is in progress (one migration at a time)."""
    current = active_migration(conn)
    if current is not None:
        raise MigrationError(
            f"migration {current.id} ({current.from_name} → {current.to_name}) is {current.state}; "
            "one migration at a time: finish or abort it first"
        )


def start(conn: psycopg.Connection, to_name: str, from_name: str | None = None, *,
          cutover_min_coverage_pct: float) -> Migration:
    """Record a migration to ``to_name`` (registered, live) from ``from_name`` (default: the read model).

    ``cutover_min_coverage_pct`` is recorded with it: the gate the cutover waits for.
    """
    settings = {"cutover_min_coverage_pct": cutover_min_coverage_pct}
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
            migrations.insert(conn, source.spec.version, to.spec.version, settings)
            migration = require_active(conn)
            _log(conn, migration, Action.MIGRATION_STARTED, {"settings": settings})
    except errors.UniqueViolation:
        ensure_none_active(conn)
        raise
    return migration


def pause(conn: psycopg.Connection) -> Migration:
    """Pause the backfill (changes keep being dual-written)."""
    return _transition(conn, ("running", "ready"), "paused", Action.MIGRATION_PAUSED)


def resume(conn: psycopg.Connection) -> Migration:
    """Resume a paused migration."""
    return _transition(conn, ("paused",), "running", Action.MIGRATION_RESUMED)


def vector_counts(conn: psycopg.Connection, version: int) -> tuple[int, int]:
    """(current vectors of model ``version``, documents), from the exact counters."""
    row = model_columns.vector_counts(conn, version)
    if row is None:
        raise MigrationError(f"model version {version} has no vector counters (retired?)")
    return row


def coverage_pct(conn: psycopg.Connection, version: int) -> float:
    """Percentage of documents whose vector for ``version`` is current (from the counters)."""
    current, total = vector_counts(conn, version)
    return 100.0 if total == 0 else 100.0 * current / total


def gate(conn: psycopg.Connection, migration: Migration) -> Gate:
    """Evaluate the cutover gate, reading only: coverage of the new model against the threshold recorded at
    start, and the latest verdict ``segue eval`` recorded for this migration's two models. A verdict reached
    on a column covered less than that threshold does not count, unless it judged bridged reads
    (``segue eval --bridged``): then its pass opens the gate at the coverage it was reached at."""
    verdict = migrations.latest_verdict(conn, migration.id, migration.from_version, migration.to_version)
    refusal = None
    if verdict is not None and verdict[3] is not None:
        new, old = (registry.get_model(conn, name).spec for name in (migration.to_name, migration.from_name))
        try:
            bridging.usable(conn, new, old)
        except bridging.BridgeRefused as error:
            refusal = str(error)
    return Gate(
        coverage_pct=coverage_pct(conn, migration.to_version),
        min_coverage_pct=migration.cutover_min_coverage_pct,
        verdict=verdict[0] if verdict else None,
        verdict_metric=verdict[1] if verdict else None,
        verdict_coverage_pct=verdict[2] if verdict else None,
        verdict_bridged=verdict[3] if verdict else None,
        bridge_refusal=refusal,
    )


def refresh(conn: psycopg.Connection) -> Migration | None:
    """Mark a running migration ready once its gate passes (workers do, periodically); the active migration."""
    migration = active_migration(conn)
    if migration is None or migration.state != "running" or not gate(conn, migration).passed:
        return migration

    def still_passes(locked: Migration) -> dict[str, Any]:
        check = gate(conn, locked)
        if not check.passed:
            raise MigrationError("; ".join(check.reasons()))
        return {"coverage_pct": check.coverage_pct}

    try:
        return _transition(conn, ("running",), "ready", Action.MIGRATION_READY, check=still_passes)
    except MigrationError:  # paused, or a new verdict closed the gate, since it was read
        return active_migration(conn)


def cutover(conn: psycopg.Connection, *, force_reason: str | None = None) -> Migration:
    """Switch reads to the new model, atomically, if the gate passes (or is forced with a reason).

    The gate is read under the migration row's lock: a verdict recorded while the cutover waited for it counts.
    """

    def gated(migration: Migration) -> dict[str, Any]:
        check = gate(conn, migration)
        if not check.passed and not force_reason:
            raise MigrationError("cutover refused: " + "; ".join(check.reasons())
                                 + " (override: --force --reason TEXT)")
        detail = {"coverage_pct": round(check.coverage_pct, 3), "verdict": check.verdict}
        if check.coverage_pct < check.min_coverage_pct and check.bridged_pass:
            detail.update(min_coverage_pct=check.min_coverage_pct, bridged=check.verdict_bridged)
        if not check.passed:
            detail.update(forced=True, reason=force_reason, gate_failures=check.reasons())
        return detail

    return _transition(conn, ("running", "ready", "rolled_back"), "cut_over", Action.MIGRATION_CUT_OVER,
                       read_version="to_version", check=gated)


def rollback(conn: psycopg.Connection) -> Migration:
    """Switch reads back to the old model; both are still dual-written."""
    return _transition(conn, ("cut_over",), "rolled_back", Action.MIGRATION_ROLLED_BACK, read_version="from_version")


def finish(conn: psycopg.Connection, *, grace: timedelta) -> Migration:
    """Retire the old model after the grace period: stop writing it, drop its index and columns."""
    migration = require_active(conn)
    if migration.state != "cut_over":
        raise MigrationError(f"migration {migration.id} is {migration.state}; finish needs cut_over")
    waited = migrations.elapsed_since(conn, migration.cut_over_at)
    if waited < grace:
        raise MigrationError(
            f"reads moved to {migration.to_name} {waited} ago; the grace period is {grace} "
            f"(rollback stays possible until then)"
        )
    old = migration.from_version

    def retire() -> Migration:
        storage_registry.retire(conn, old)
        model_columns.drop(conn, old)
        return _transition(conn, ("cut_over",), "finished", Action.MIGRATION_FINISHED, {"retired": migration.from_name})

    return upgrades.run_ddl(conn, retire, what=f"retiring model {migration.from_name!r}")


def abort(conn: psycopg.Connection) -> Migration:
    """Abandon the migration before its cutover: retire the new model, drop its index, columns and counters.

    Refused once reads use the new model (cut over: roll back first). Readers and workers
    that still have the new model in view retry without it: its column is dropped in one
    transaction, which waits for the queries using it to end (a short lock wait, retried).
    """
    migration = require_active(conn)
    if migration.state == "cut_over":
        raise MigrationError(f"migration {migration.id} is cut over: reads use {migration.to_name}; "
                             f"roll them back to {migration.from_name} first (segue migrate rollback), then abort")

    def retire_new(locked: Migration) -> dict[str, Any]:
        if any(m.serving_reads and m.spec.version == locked.to_version for m in registry.list_models(conn)):
            raise MigrationError(f"reads use {locked.to_name}: roll them back first (segue migrate rollback)")
        storage_registry.retire(conn, locked.to_version)
        model_columns.drop(conn, locked.to_version)
        return {"retired": locked.to_name}

    return upgrades.run_ddl(
        conn, lambda: _transition(conn, ABORTABLE, "aborted", Action.MIGRATION_ABORTED, check=retire_new),
        what=f"retiring model {migration.to_name!r}")
