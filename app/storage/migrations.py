"""The lifecycle's tables: ``migrations`` (one row per migration, at most one not ended) and ``model_evaluations``.

Rows come back as dicts; :mod:`segue.control.migration` decides what a state allows.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

ENDED = ("finished", "aborted")  # the states a migration ends in; any other is the one in progress

_SELECT = (
    "SELECT g.*, f.name AS from_name, t.name AS to_name FROM migrations g"
    " JOIN embedding_models f ON f.version = g.from_version JOIN embedding_models t ON t.version = g.to_version"
)


def active(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The row of the migration that has not ended (with its models' names), if any."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_SELECT + " WHERE g.state <> ALL(%s)", (list(ENDED),)).fetchone()


def get(conn: psycopg.Connection, migration_id: int) -> dict[str, Any] | None:
    """The row of migration ``migration_id`` (with its models' names), if there is one."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_SELECT + " WHERE g.id = %s", (migration_id,)).fetchone()


def insert(conn: psycopg.Connection, from_version: int, to_version: int, settings: dict[str, Any]) -> int:
    """Record a running migration; its id (a unique index refuses a second one in progress)."""
    return conn.execute(
        "INSERT INTO migrations (from_version, to_version, state, settings) VALUES (%s, %s, 'running', %s)"
        " RETURNING id",
        (from_version, to_version, Jsonb(settings)),
    ).fetchone()[0]


def lock(conn: psycopg.Connection, migration_id: int) -> None:
    """Hold migration ``migration_id``'s row until the transaction ends."""
    conn.execute("SELECT 1 FROM migrations WHERE id = %s FOR UPDATE", (migration_id,))


def set_state(conn: psycopg.Connection, migration_id: int, state: str) -> None:
    """Move migration ``migration_id`` to ``state``, stamping the cutover and the finish."""
    conn.execute(
        "UPDATE migrations SET state = %s, updated_at = now(),"
        " cut_over_at = CASE WHEN %s = 'cut_over' THEN now() ELSE cut_over_at END,"
        " finished_at = CASE WHEN %s = 'finished' THEN now() ELSE finished_at END WHERE id = %s",
        (state, state, state, migration_id),
    )


def elapsed_since(conn: psycopg.Connection, at: datetime) -> timedelta:
    """How long ago ``at`` was, by the database's clock."""
    return conn.execute("SELECT now() - %s::timestamptz", (at,)).fetchone()[0]


def latest_verdict(conn: psycopg.Connection, migration_id: int, old_version: int,
                   new_version: int) -> tuple[str, str, float | None, dict | None] | None:
    """(verdict, metric, the new model's coverage when reached, the adapter it was bridged through or None) of the
    latest labelled evaluation recorded for the migration and these two models, if any."""
    return conn.execute(
        "SELECT verdict, metric, (detail->'coverage'->>'new')::float, detail->'bridged' FROM model_evaluations"
        " WHERE migration_id = %s AND kind = 'labelled' AND old_version = %s AND new_version = %s"
        " ORDER BY evaluated_at DESC, id DESC LIMIT 1",
        (migration_id, old_version, new_version),
    ).fetchone()


def latest_verdict_summary(conn: psycopg.Connection, migration_id: int) -> tuple[str, datetime, str] | None:
    """(verdict, when, why) of the migration's latest labelled evaluation, if any."""
    return conn.execute(
        "SELECT verdict, evaluated_at, detail->>'why' FROM model_evaluations WHERE migration_id = %s"
        " AND kind = 'labelled' ORDER BY evaluated_at DESC, id DESC LIMIT 1", (migration_id,)).fetchone()


def record_labelled(conn: psycopg.Connection, *, migration_id: int | None, old_version: int, new_version: int,
                    metric: str, old_value: float, new_value: float, verdict: str, detail: dict[str, Any]) -> int:
    """Record a labelled evaluation and its verdict; its id."""
    return conn.execute(
        "INSERT INTO model_evaluations (migration_id, kind, old_version, new_version, metric, old_value, new_value,"
        " verdict, detail) VALUES (%s, 'labelled', %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (migration_id, old_version, new_version, metric, old_value, new_value, verdict, Jsonb(detail)),
    ).fetchone()[0]


def record_shadow(conn: psycopg.Connection, *, migration_id: int | None, old_version: int, new_version: int,
                  metric: str, new_value: float | None, detail: dict[str, Any]) -> int:
    """Record a shadow comparison as evidence (no verdict); its id."""
    return conn.execute(
        "INSERT INTO model_evaluations (migration_id, kind, old_version, new_version, metric, new_value, detail)"
        " VALUES (%s, 'shadow', %s, %s, %s, %s, %s) RETURNING id",
        (migration_id, old_version, new_version, metric, new_value, Jsonb(detail)),
    ).fetchone()[0]
