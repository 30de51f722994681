"""Migration progress as SQL sees it, and its rendering for the terminal."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from rich.table import Table

PROGRESS_COLUMNS = [
    ("model_version", "v"),
    ("model", "model"),
    ("dim", "dim"),
    ("serving_reads", "reads"),
    ("total_documents", "docs"),
    ("current_vectors", "current"),
    ("stale_vectors", "stale"),
    ("missing_vectors", "missing"),
    ("coverage_pct", "coverage %"),
    ("vectors_last_5m", "last 5 min"),
    ("rate_per_s", "vec/s"),
    ("eta", "ETA"),
    ("failures_24h", "failures 24h"),
    ("truncated_documents", "truncated"),
]


def fetch_progress(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Rows of the migration_progress view, one per live model."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM migration_progress ORDER BY model_version").fetchall()


def dead_letter_count(conn: psycopg.Connection) -> int:
    """Events dead-lettered in the last 24 hours (any model or none)."""
    (count,) = conn.execute(
        "SELECT coalesce(sum(events), 0) FROM activity_counters"
        " WHERE action = 'dead_lettered' AND minute >= now() - interval '24 hours'"
    ).fetchone()
    return int(count)


def format_cell(value: Any) -> str:
    """A progress value for the terminal (intervals as h:mm:ss, None as a dash)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "✓" if value else ""
    if hasattr(value, "total_seconds"):
        seconds = int(value.total_seconds())
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return str(value)


def progress_table(rows: list[dict[str, Any]], *, title: str = "migration_progress") -> Table:
    """A rich table of migration_progress rows."""
    table = Table(title=title)
    for _, header in PROGRESS_COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(*(format_cell(row[name]) for name, _ in PROGRESS_COLUMNS))
    return table


def origin_table(conn: psycopg.Connection) -> Table:
    """Vectors per live model and origin (change, read_miss, backfill) from migration_progress_by_origin."""
    table = Table(title="migration_progress_by_origin")
    for header in ("v", "model", "origin", "last 5 min", "last 24 h"):
        table.add_column(header, justify="left" if header in ("model", "origin") else "right")
    for row in conn.execute(
        "SELECT model_version, model, origin, vectors_last_5m, vectors_last_24h FROM migration_progress_by_origin"
        " ORDER BY model_version, origin"
    ):
        table.add_row(*(format_cell(value) for value in row))
    return table


def workers_table(rows: list[dict[str, Any]], *, lost_after_s: float) -> Table:
    """Workers from their heartbeats: live ones (beat within ``lost_after_s``) and lost ones."""
    table = Table(title=f"workers (lost after {lost_after_s:g} s of silence)")
    for header in ("worker", "status", "state", "silent s", "partitions", "lag", "models", "device", "events/s",
                   "metrics"):
        table.add_column(header, justify="right" if header in ("silent s", "lag", "events/s") else "left")
    for row in rows:
        table.add_row(row["worker_id"], "live" if row["live"] else "[bold red]lost[/]", row["state"],
                      f"{row['silent_s']:.0f}", ", ".join(row["partitions"]) or "–", str(sum(row["lag"].values())),
                      ", ".join(row["models"]) or "–", row["device"] or "–", f"{row['events_per_s']:g}",
                      row["metrics_url"] or "–")
    return table


def halted_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model a live worker stopped writing, with the worker's reason and what to do."""
    return [f"[bold red]halted[/] on {row['worker_id']}: {message}"
            for row in rows if row["live"] for message in row["halted"].values()]


def freshness_table(conn: psycopg.Connection) -> Table:
    """Publish → commit latency by origin over the last 5 minutes, from the changelog."""
    table = Table(title="freshness, last 5 min (publish → commit)")
    for header in ("origin", "outcomes", "p50 s", "p95 s", "dead letters"):
        table.add_column(header, justify="left" if header == "origin" else "right")
    for origin, outcomes, p50, p95, dead in conn.execute(
        "SELECT origin, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) / 1000,"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) / 1000,"
        " count(*) FILTER (WHERE action = 'dead_lettered')"
        " FROM migration_changelog WHERE at > now() - interval '5 minutes' AND origin <> 'control'"
        " GROUP BY origin ORDER BY origin"
    ):
        table.add_row(origin, str(outcomes), _seconds(p50), _seconds(p95), str(dead))
    return table


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
