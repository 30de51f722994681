"""``segue backfill``: enqueue the documents a model lacks, at low priority, within its budgets."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import click

from segue.cli.common import (
    REFUSALS,
    console,
    database,
)
from segue.control import migration, registry
from segue.devtools import services
from segue.settings import Settings
from segue.storage import connections

if TYPE_CHECKING:
    pass


@click.command()
@click.option("--model", "name", help="model to backfill (default: the migration's new model)")
@click.option("--rate", type=float, help="at most this many documents a second")
@click.option("--max-docs", type=int, help="stop after this many documents")
@click.option("--max-gpu-seconds", type=float, help="stop after this much estimated embedding time")
@click.option("--throughput", type=float, help="docs/s for the GPU-seconds budget (default: measured here)")
@click.option("--max-usd", type=float, help="stop before an API model's tokens cost more (at its registered price)")
@click.option("--page-size", default=500, show_default=True, help="documents per keyset page (watermark step)")
@click.pass_obj
def backfill(settings: Settings, name: str | None, rate: float | None, max_docs: int | None,
             max_gpu_seconds: float | None, throughput: float | None, max_usd: float | None, page_size: int) -> None:
    """Enqueue every document lacking a current vector, at low priority; resumable.

    With --max-usd the documents' tokens are counted with the model's tokenizer (after
    truncation) as they are enqueued, and the run stops before their price exceeds it.
    """
    from segue.control.backfill import BackfillLimits, run_backfill

    database_url = database(settings)
    bootstrap = services.kafka_bootstrap(settings)
    with connections.connect(settings, database_url) as conn:
        try:
            spec = registry.get_model(conn, name or migration.require_active(conn).to_name).spec
            registry.require_embedded(spec)
        except REFUSALS as error:
            raise click.ClickException(str(error)) from None
        if max_gpu_seconds is not None and throughput is None:
            from segue.control.plan import measure_throughput, sample_texts
            from segue.embedding.engine import EmbeddingEngine

            engine = EmbeddingEngine.from_settings(settings)
            try:
                throughput = measure_throughput(engine, spec, sample_texts(conn, 32))
                console.print(f"measured {throughput:.1f} docs/s for {spec.name} on {engine.device_of(spec)}")
            finally:
                engine.close()
        engine = None
        if max_usd is not None:
            from segue.embedding.engine import EmbeddingEngine

            engine = EmbeddingEngine.from_settings(settings)
        limits = BackfillLimits(
            rate=rate, max_docs=max_docs, max_gpu_seconds=max_gpu_seconds, throughput=throughput, max_usd=max_usd,
            price_per_million_tokens=spec.config.get("price_per_million_tokens"),
            count_tokens=engine and (lambda texts: [min(count, spec.max_tokens or count)
                                                    for count in engine.count_tokens(spec, texts)]))
        try:
            outcome = asyncio.run(run_backfill(settings, conn, bootstrap, spec, limits, page_size=page_size,
                                               console=console))
        except REFUSALS as error:
            raise click.ClickException(str(error)) from None
        finally:
            if engine is not None:
                engine.close()
    console.print(outcome.describe(limits))
