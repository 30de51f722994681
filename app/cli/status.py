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
    """Print migration_progress, vectors by origin, freshness, the workers and the dead letters.

    Tables fit the terminal: on a narrow one the less urgent columns are left out.
    """
    from rich.live import Live

    from segue.cli.views import status_view

    with connections.connect(settings, database(settings, read_only=True), read_only=True) as conn:
        if not watch:
            console.print(status_view(conn, settings, width=console.width))
            return
        with Live(status_view(conn, settings, width=console.width), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(every)
                    live.update(status_view(conn, settings, width=console.width), refresh=True)
            except KeyboardInterrupt:
                pass
