"""``segue status``: progress, vectors by origin, freshness, the workers and the dead letters."""

from __future__ import annotations

import time

import click

from segue.cli.common import (
    console,
    database,
)
from segue.settings import Settings
from segue.storage import connections


@click.command()
@click.option("--watch", is_flag=True, help="keep the view up, refreshed every --every seconds")
@click.option("--every", default=3.0, show_default=True, help="seconds between refreshes with --watch")
@click.pass_obj
def status(settings: Settings, watch: bool, every: float) -> None:
    """Print migration_progress, vectors by origin, freshness, the workers and the dead letters."""
    from rich.console import Group
    from rich.live import Live

    from segue.cli.views import (
        dead_letter_count,
        fetch_progress,
        freshness_table,
        halted_lines,
        origin_table,
        progress_table,
        workers_table,
    )
    from segue.quality.shadow import drifting
    from segue.worker.heartbeat import list_workers

    def view(conn) -> Group:
        drift = [f"[bold red]query drift[/]: {model}'s logged queries on {day:%Y-%m-%d} moved {shift:.3f} from the "
                 f"baseline (cosine distance of centroids, over SEGUE_DRIFT_MAX_SHIFT {settings.drift_max_shift:g})"
                 for model, day, shift in drifting(conn, max_shift=settings.drift_max_shift)]
        workers = list_workers(conn, lost_after_s=settings.worker_lost_after_s)
        return Group(
            progress_table(fetch_progress(conn)), origin_table(conn), freshness_table(conn),
            workers_table(workers, lost_after_s=settings.worker_lost_after_s),
            f"dead letters in the last 24 h: {dead_letter_count(conn)}", *drift, *halted_lines(workers),
        )

    with connections.connect(settings, database(settings, read_only=True), read_only=True) as conn:
        if not watch:
            console.print(view(conn))
            return
        with Live(view(conn), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(every)
                    live.update(view(conn), refresh=True)
            except KeyboardInterrupt:
                pass
