"""``segue db``: the database schema."""

from __future__ import annotations

import click

from segue.cli.common import (
    console,
)
from segue.devtools import services
from segue.settings import Settings
from segue.storage import upgrades


@click.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@click.pass_obj
def db_upgrade(settings: Settings) -> None:
    """Apply the schema upgrade steps the database lacks (workers also do at start)."""
    applied = upgrades.upgrade(settings, services.database_url(settings, start=False))
    if applied:
        console.print(f"applied {len(applied)} schema upgrade(s): {', '.join(applied)}")
    console.print(f"the database is at schema version {upgrades.latest_schema_version()}")
