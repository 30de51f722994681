"""Migration progress as SQL sees it, and its rendering for the terminal.

Tables fit the console they are printed on: a column is shown only when it fits whole
(by priority: the model, its coverage and ETA first), numbers never wrap, and long names
(models, worker ids, partitions) fold onto a second line instead of being cut to "…".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from rich.cells import cell_len
from rich.console import Group
from rich.table import Table
from rich.text import Text

from segue.storage import changelog

FOLDED_WIDTH = 24  # a folding column is given at most this much when widths are shared out


@dataclass(frozen=True)
class Column:
    """A table column: its header, its priority (0 first: shown while the console has room) and its layout."""

    header: str
    priority: int
    text: bool = False  # left-aligned text that folds (names, lists), else a right-aligned value that never wraps


PROGRESS_COLUMNS = [
    ("model_version", Column("v", 0)),
    ("model", Column("model", 0, text=True)),
    ("dim", Column("dim", 6)),
    ("serving_reads", Column("reads", 3)),
    ("total_documents", Column("docs", 4)),
    ("current_vectors", Column("current", 1)),
    ("stale_vectors", Column("stale", 5)),
    ("missing_vectors", Column("missing", 2)),
    ("coverage_pct", Column("coverage %", 0)),
    ("vectors_last_5m", Column("last 5 min", 7)),
    ("rate_per_s", Column("vec/s", 1)),
    ("eta", Column("ETA", 0)),
    ("failures_24h", Column("failures 24h", 3)),
    ("truncated_documents", Column("truncated", 8)),
]


def fitted_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str | Text]],
                 width: int | None) -> Table:
    """A table of ``rows`` with the columns that fit ``width`` (all of them when None), in their order."""
    shown = list(range(len(columns)))
    if width is not None:
        need = [min(max([len(c.header)] + [cell_len(str(row[i])) for row in rows]), FOLDED_WIDTH if c.text else width)
                + 3 for i, c in enumerate(columns)]  # its text, and the padding and border around it
        used, shown = 1, []
        for i in sorted(range(len(columns)), key=lambda i: columns[i].priority):
            if used + need[i] <= width or columns[i].priority == 0:
                used += need[i]
                shown.append(i)
        shown.sort()
    table = Table(title=title)
    for i in shown:
        column = columns[i]
        table.add_column(column.header, justify="left" if column.text else "right", no_wrap=not column.text,
                         overflow="fold", min_width=None if column.text else len(column.header))
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def fetch_progress(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Rows of the migration_progress view, one per live model."""
    return changelog.progress(conn)


def dead_letter_count(conn: psycopg.Connection) -> int:
    """Events dead-lettered in the last 24 hours (any model or none)."""
    return changelog.dead_letters_last_day(conn)


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


def progress_table(rows: list[dict[str, Any]], *, title: str = "migration_progress",
                   width: int | None = None) -> Table:
    """A rich table of migration_progress rows, with the columns that fit ``width``."""
    return fitted_table(title, [column for _, column in PROGRESS_COLUMNS],
                        [[format_cell(row[name]) for name, _ in PROGRESS_COLUMNS] for row in rows], width)


def origin_table(conn: psycopg.Connection, *, width: int | None = None) -> Table:
    """Vectors per live model and origin (change, read_miss, backfill) from migration_progress_by_origin."""
    columns = [Column("v", 0), Column("model", 0, text=True), Column("origin", 0, text=True), Column("last 5 min", 0),
               Column("last 24 h", 1)]
    rows = changelog.progress_by_origin(conn)
    return fitted_table("migration_progress_by_origin", columns, [[format_cell(v) for v in row] for row in rows],
                        width)


WORKER_COLUMNS = [Column("worker", 0, text=True), Column("status", 0), Column("state", 0), Column("silent s", 1),
                  Column("partitions", 5, text=True), Column("lag", 1), Column("models", 4, text=True),
                  Column("device", 3), Column("events/s", 2), Column("metrics", 6, text=True)]


def worker_status(row: dict[str, Any]) -> str:
    """stopped (it said so on its way out), live (beat within the expiry) or lost (silent longer)."""
    return "stopped" if row["state"] == "stopped" else "live" if row["live"] else "lost"


def workers_table(rows: list[dict[str, Any]], *, lost_after_s: float, width: int | None = None) -> Table:
    """Workers from their heartbeats: live, stopped, and lost ones (silent for ``lost_after_s``)."""
    cells = [[row["worker_id"], Text(worker_status(row), style="bold red" if worker_status(row) == "lost" else ""),
              row["state"], f"{row['silent_s']:.0f}",
              ", ".join(row["partitions"]) or "–", str(sum(row["lag"].values())), ", ".join(row["models"]) or "–",
              row["device"] or "–", f"{row['events_per_s']:g}", row["metrics_url"] or "–"] for row in rows]
    return fitted_table(f"workers (lost after {lost_after_s:g} s of silence)", WORKER_COLUMNS, cells, width)


def halted_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model a live worker stopped writing, with the worker's reason and what to do."""
    return [f"[bold red]halted[/] on {row['worker_id']}: {message}"
            for row in rows if row["live"] for message in row["halted"].values()]


def freshness_table(conn: psycopg.Connection) -> Table:
    """Publish → commit latency by origin over the last 5 minutes, from the changelog."""
    table = Table(title="freshness, last 5 min (publish → commit)")
    for header in ("origin", "outcomes", "p50 s", "p95 s", "dead letters"):
        table.add_column(header, justify="left" if header == "origin" else "right")
    for origin, outcomes, p50, p95, dead in changelog.freshness(conn):
        table.add_row(origin, str(outcomes), _seconds(p50), _seconds(p95), str(dead))
    return table


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def status_view(conn: psycopg.Connection, settings, *, width: int | None = None) -> Group:
    """What ``segue status`` prints: progress, vectors by origin, freshness, workers, dead letters, drift and halted
    models, fitted to ``width`` columns."""
    from segue.quality.shadow import drifting
    from segue.worker.heartbeat import list_workers

    drift = [f"[bold red]query drift[/]: {model}'s logged queries on {day:%Y-%m-%d} moved {shift:.3f} from the "
             f"baseline (cosine distance of centroids, over SEGUE_DRIFT_MAX_SHIFT {settings.drift_max_shift:g})"
             for model, day, shift in drifting(conn, max_shift=settings.drift_max_shift)]
    workers = list_workers(conn, lost_after_s=settings.worker_lost_after_s)
    return Group(
        progress_table(fetch_progress(conn), width=width), origin_table(conn, width=width),
        freshness_table(conn), workers_table(workers, lost_after_s=settings.worker_lost_after_s, width=width),
        f"dead letters in the last 24 h: {dead_letter_count(conn)}", *drift, *halted_lines(workers),
    )
