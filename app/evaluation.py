"""Quality verdicts of a migration's new model against its old one, which the cutover gate reads."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb


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
