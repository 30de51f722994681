"""``segue migrate``: plan, start, pause, resume, cut over, roll back, finish, abort and index a migration."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import click

from segue.cli.common import (
    OPTION_OPTION,
    PROVIDER_OPTION,
    REFUSALS,
    chunking_options,
    console,
    control,
    database,
    model_source,
    provider_options,
)
from segue.control import bridging, indexes, migration, registry
from segue.embedding import providers
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import connections


@click.group()
def migrate() -> None:
    """Run a migration: plan, start, pause, resume, cutover, rollback, finish, abort."""


@migrate.command("plan")
@click.option("--to", "to_name", required=True, help="the new model (registered name, or any name with --source)")
@click.option("--source", help="model source, when the model is not registered yet (a folder, a cached hub id, "
                               "or bundled:NAME)")
@PROVIDER_OPTION
@OPTION_OPTION
@chunking_options
@click.option("--sample", default=64, show_default=True, help="documents embedded to measure throughput")
@click.pass_obj
def migrate_plan(settings: Settings, to_name: str, source: str | None, provider: str | None,
                 option_pairs: tuple[str, ...], chunking: dict | None, sample: int) -> None:
    """Measure the new model here and estimate documents, time, cost, storage and index memory."""
    from segue.control.plan import plan
    from segue.embedding.engine import EmbeddingEngine

    if chunking and source is None:
        raise click.UsageError("the chunking options describe a model to register: give --source too")
    source = model_source(settings, source) if source is not None else None

    def estimate(conn):
        try:
            spec = registry.get_model(conn, to_name).spec
        except registry.RegistryError:
            if source is None:
                raise registry.RegistryError(f"model {to_name!r} is not registered; pass --source to plan it") from None
            profile = providers.inspect(source, provider=provider, options=provider_options(option_pairs),
                                        chunking=chunking)
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

    for line in control(settings, estimate).lines():
        console.print(line)


@migrate.command("start")
@click.option("--to", "to_name", required=True, help="the new model's name")
@click.option("--from", "from_name", help="the old model (default: the one serving reads)")
@click.option("--source", help="register the new model from this source first (a folder, a cached hub id, or "
                               "bundled:NAME)")
@PROVIDER_OPTION
@OPTION_OPTION
@chunking_options
@click.option("--min-coverage", type=float, help="coverage % the cutover waits for [default: SEGUE_CUTOVER_MIN_COVERAGE_PCT]")
@click.pass_obj
def migrate_start(settings: Settings, to_name: str, from_name: str | None, source: str | None, provider: str | None,
                  option_pairs: tuple[str, ...], chunking: dict | None, min_coverage: float | None) -> None:
    """Start a migration: NEW is dual-written from now on. One migration at a time.

    With --source the model is registered and the migration recorded in one transaction:
    if either fails, neither happened.
    """
    if chunking and source is None:
        raise click.UsageError("the chunking options register a new model: give --source too")
    if source is not None:  # before the model loads (seconds): a second migration is refused at once
        control(settings, migration.ensure_none_active)
    source = model_source(settings, source) if source is not None else None
    try:
        profile = (providers.inspect(source, provider=provider, options=provider_options(option_pairs),
                                     chunking=chunking) if source is not None else None)
    except REFUSALS as error:  # a wrong --option: one line, not a traceback
        raise click.ClickException(str(error)) from None

    def register_and_start(conn):
        with conn.transaction():
            if profile is not None:
                migration.ensure_none_active(conn)
                registry.register_model(conn, to_name, source, profile=profile)
            return migration.start(conn, to_name, from_name, cutover_min_coverage_pct=(
                settings.cutover_min_coverage_pct if min_coverage is None else min_coverage))

    started = control(settings, register_and_start)
    console.print(f"migration {started.id} started: {started.from_name} → {started.to_name}; "
                  "every change is dual-written; run segue backfill for the rest")


@migrate.command("status")
@click.pass_obj
def migrate_status(settings: Settings) -> None:
    """Show the migration, what a cutover would do now, the index and the progress (reads only)."""
    from segue.cli.views import fetch_progress, progress_table
    from segue.quality import evaluation

    with connections.connect(settings, database(settings, read_only=True), read_only=True) as conn:
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
            new, old = bridging.migration_models(conn)
            console.print("bridged reads: " + bridging.describe(conn, new, old), markup=False)
        console.print(progress_table(fetch_progress(conn), width=console.width))


@migrate.command("pause")
@click.pass_obj
def migrate_pause(settings: Settings) -> None:
    """Pause the backfill; changes are still dual-written."""
    console.print(f"migration {control(settings, migration.pause).id} paused")


@migrate.command("resume")
@click.pass_obj
def migrate_resume(settings: Settings) -> None:
    """Resume a paused migration."""
    console.print(f"migration {control(settings, migration.resume).id} running")


@migrate.command("cutover")
@click.option("--force", is_flag=True, help="switch even though the gate is closed")
@click.option("--reason", help="why the gate is forced (required with --force; logged)")
@click.pass_obj
def migrate_cutover(settings: Settings, force: bool, reason: str | None) -> None:
    """Switch reads to the new model if coverage (the threshold set at start) and the latest verdict pass."""
    if force and not reason:
        raise click.UsageError("--force needs --reason")

    def cut_over(conn):
        done = migration.cutover(conn, force_reason=reason if force else None)
        return done, migration.gate(conn, done)

    done, check = control(settings, cut_over)
    console.print(f"reads now use {done.to_name} (migration {done.id} cut over); rollback is instant until finish")
    if force and not check.passed:
        console.print(f"forced past a closed gate ({'; '.join(check.reasons())}); the reason is logged in "
                      f"migration_changelog: {reason}", markup=False)
    elif force:
        console.print("the gate was open: nothing was forced (and --reason was not logged)")


@migrate.command("rollback")
@click.pass_obj
def migrate_rollback(settings: Settings) -> None:
    """Switch reads back to the old model (still dual-written)."""
    done = control(settings, migration.rollback)
    console.print(f"reads back on {done.from_name} (migration {done.id} rolled back)")


@migrate.command("finish")
@click.option("--grace", default=3600.0, show_default=True, help="seconds reads must have used the new model")
@click.pass_obj
def migrate_finish(settings: Settings, grace: float) -> None:
    """Retire the old model: stop writing it, drop its index and columns."""
    done = control(settings, migration.finish, grace=timedelta(seconds=grace))
    console.print(f"migration {done.id} finished: {done.from_name} retired, its columns and index dropped")


@migrate.command("abort")
@click.pass_obj
def migrate_abort(settings: Settings) -> None:
    """Abandon the migration before its cutover: retire the new model, drop its index and columns."""
    done = control(settings, migration.abort)
    console.print(f"migration {done.id} aborted: {done.to_name} retired, its columns and index dropped; "
                  f"reads stay on {done.from_name}")


@migrate.command("index")
@click.option("--model", "name", help="model whose column to index (default: the migration's new model)")
@click.option("--now", is_flag=True, help="build even below SEGUE_INDEX_MIN_COVERAGE_PCT (later vectors are "
                                          "inserted into the graph one by one)")
@click.pass_obj
def migrate_index(settings: Settings, name: str | None, now: bool) -> None:
    """Build the HNSW index (CREATE INDEX CONCURRENTLY) once coverage passes the threshold (or --now).

    Below the threshold it says so and exits 1, building nothing.
    """
    policy = indexes.IndexPolicy.from_settings(settings)

    def build(conn):
        version = registry.get_model(conn, name).spec.version if name else migration.require_active(conn).to_version
        return indexes.build(conn, version, replace(policy, min_coverage_pct=0.0) if now else policy)[1]

    console.print(control(settings, build))
