"""``segue adapter``: fit and show the adapter that bridges reads to the new model before its column is complete."""

from __future__ import annotations

import time

import click

from segue.cli.common import console, control
from segue.control import bridging
from segue.embedding import adapters as maps
from segue.settings import Settings


@click.group("adapter")
def adapter_group() -> None:
    """The map from the new model's space into the old one's that bridged reads use."""


@adapter_group.command("fit")
@click.option("--kind", type=click.Choice([*maps.KINDS, "best"]), default=maps.DEFAULT_KINDS[0], show_default=True,
              help="the map: orthogonal (procrustes), ridge with a bias (affine), or the best of both on held-out "
                   "pairs (documents' neighbours, which can favour affine although it carries queries worse)")
@click.pass_obj
def adapter_fit(settings: Settings, kind: str) -> None:
    """Fit an adapter on the documents the active migration has embedded with both models, and record it.

    Readers (mode bridged, or incremental reading the new model) use it once its held-out
    neighbour retention reaches SEGUE_ADAPTER_MIN_RETENTION; a poorer one is recorded, and
    refused with its figures.
    """
    started = time.perf_counter()
    kinds = maps.KINDS if kind == "best" else (kind,)
    fit = control(settings, lambda conn: bridging.fit(conn, settings, kinds))
    fitted = fit.fitted
    console.print(f"adapter {fit.adapter_id}: {fitted.space_map.kind}, {fitted.pairs} pairs, fitted in "
                  f"{time.perf_counter() - started:.1f} s; held-out neighbour retention: "
                  f"{bridging.describe_held_out(fitted.held_out)}")
    if not fit.passed:
        raise click.ClickException(
            f"adapter {fit.adapter_id} keeps {fitted.retention:.1%} of neighbours, below the {fit.min_retention:.0%} "
            "bridged reads need: readers keep searching each model with its own query")
    console.print(f"passed (≥ {fit.min_retention:.0%}): bridged reads use it; segue eval --bridged measures "
                  "what they get")


@adapter_group.command("show")
@click.pass_obj
def adapter_show(settings: Settings) -> None:
    """The active migration's latest adapter, and whether readers may use it."""

    def show(conn) -> None:
        new, old = bridging.migration_models(conn)
        console.print(f"bridging {new.name} → {old.name}: {bridging.describe(conn, new, old)}", markup=False)

    control(settings, show, read_only=True)
