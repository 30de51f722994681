"""``segue demo``: the whole flow on embedded services with a real corpus."""

from __future__ import annotations

import click

from segue.cli.common import (
    console,
)
from segue.settings import Settings


@click.command()
@click.option("--docs", default=1000, show_default=True, help="documents of the SciFact corpus to publish")
@click.pass_obj
def demo(settings: Settings, docs: int) -> None:
    """Run the whole flow on embedded services with a real corpus."""
    from segue.devtools.demo import run_demo

    run_demo(settings, docs=docs, console=console)
