"""``segue services``: the embedded PostgreSQL and Kafka broker."""

from __future__ import annotations

import click

from segue.cli.common import (
    console,
)
from segue.devtools import services
from segue.settings import Settings, redact


@click.command("services")
@click.argument("action", type=click.Choice(["up", "down", "status"]))
@click.pass_obj
def services_command(settings: Settings, action: str) -> None:
    """Manage the embedded PostgreSQL and Kafka broker (up, down, status).

    Only ``up`` starts them; ``status`` also tries external services (SEGUE_* URLs) and says
    whether they answer.
    """
    result = {"up": services.up, "down": services.down, "status": services.status}[action](settings)
    for s in result:
        console.print(f"{s.name:<11} {s.state:<11} {redact(s.address or '')}  {s.detail}", markup=False)
