"""``segue backfill``: enqueue the documents a model lacks, at low priority, within its budgets."""

from __future__ import annotations

import asyncio
import functools
import sys
import time

import click

from segue.cli.common import (
    console,
    database,
    kafka,
)
from segue.control import migration, registry
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import connections

STALLED_AFTER_S = 120.0  # --wait gives up after this long without a new vector


@click.command()
@click.option("--model", "name", help="model to backfill (default: the migration's new model)")
@click.option("--rate", type=float, help="at most this many documents a second")
@click.option("--max-docs", type=int, help="stop after this many documents")
@click.option("--max-gpu-seconds", type=float, help="stop after this much estimated embedding time")
@click.option("--throughput", type=float, help="docs/s for the GPU-seconds budget (default: measured here)")
@click.option("--max-usd", type=float, help="stop before an API model's tokens cost more (at its registered price)")
@click.option("--page-size", default=500, show_default=True, help="documents per keyset page (watermark step)")
@click.option("--wait", is_flag=True, help="once every document is enqueued, follow the workers' embedding until "
                                           "each has a current vector")
@click.pass_obj
def backfill(settings: Settings, name: str | None, rate: float | None, max_docs: int | None,
             max_gpu_seconds: float | None, throughput: float | None, max_usd: float | None, page_size: int,
             wait: bool) -> None:
    """Enqueue every document lacking a current vector, at low priority; resumable.

    The workers embed what is enqueued; --wait follows them to the end. With --max-usd the
    documents' tokens are counted with the model's tokenizer (after truncation; a chunked model's over its
    chunks) as they are enqueued, and the run stops before their price exceeds it. Interrupted (Ctrl-C), it
    resumes where it stopped when run again.
    """
    from segue.control.backfill import BackfillLimits, run_backfill

    database_url = database(settings)
    bootstrap = kafka(settings)
    with connections.connect(settings, database_url) as conn:
        spec = registry.get_model(conn, name or migration.require_active(conn).to_name).spec
        registry.require_embedded(spec)
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
            from segue.control.plan import tokens_given
            from segue.embedding.engine import EmbeddingEngine

            engine = EmbeddingEngine.from_settings(settings)
        limits = BackfillLimits(
            rate=rate, max_docs=max_docs, max_gpu_seconds=max_gpu_seconds, throughput=throughput, max_usd=max_usd,
            price_per_million_tokens=spec.config.get("price_per_million_tokens"),
            count_tokens=engine and functools.partial(tokens_given, engine, spec))
        try:
            outcome = asyncio.run(run_backfill(settings, conn, bootstrap, spec, limits, page_size=page_size,
                                               console=console))
        except KeyboardInterrupt:
            console.print("interrupted: what the broker acknowledged stays enqueued; run segue backfill again to "
                          "resume after the last acknowledged page")
            sys.exit(130)
        finally:
            if engine is not None:
                engine.close()
        console.print(outcome.describe(limits))
        if wait and outcome.stopped == "complete":
            _follow_embedding(conn, spec)
        elif wait:
            console.print("not waiting: some documents were left for a later run (the workers embed what was enqueued)")


def _follow_embedding(conn, spec: ModelSpec) -> None:
    """Show the workers embedding ``spec`` until every document has a current vector (or nothing moves for
    STALLED_AFTER_S); Ctrl-C stops watching, not the workers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    current, total = migration.vector_counts(conn, spec.version)
    moved_at, seen = time.monotonic(), current
    progress = Progress(TextColumn(f"backfill {spec.name}: embedded"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console, transient=False)
    try:
        with progress:
            task = progress.add_task("embedded", total=total, completed=current)
            while current < total:
                time.sleep(1.0)
                current, total = migration.vector_counts(conn, spec.version)
                progress.update(task, completed=current, total=total)
                if current != seen:
                    moved_at, seen = time.monotonic(), current
                elif time.monotonic() - moved_at > STALLED_AFTER_S:
                    raise click.ClickException(
                        f"no new {spec.name} vector for {STALLED_AFTER_S:g}s with {total - current} document(s) "
                        "still lacking one: are workers running? segue status shows them and the failures")
    except KeyboardInterrupt:
        console.print("stopped watching; the workers go on embedding (segue status shows their progress)")
        return
    console.print(f"every document has a current {spec.name} vector ({current}/{total})")
