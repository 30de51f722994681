"""``segue worker``: Faust workers that dual-write changes and re-embed read misses and the backfill.

One worker runs in this process; more run under a supervisor (``segue.worker.supervisor``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import click

from segue.cli.common import (
    database,
    kafka,
    kafka_logs,
    log,
)
from segue.control import registry
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import connections

if TYPE_CHECKING:
    from segue.embedding.engine import EmbeddingEngine
    from segue.worker.ops import WorkerState


@click.command()
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Faust workers to run on this host under one supervisor [default: SEGUE_WORKER_PROCESSES, else "
                   "one per GPU, else one per core]")
@click.pass_obj
def worker(settings: Settings, processes: int | None) -> None:
    """Run Faust workers: dual-write changes, re-embed read misses and the backfill."""
    from segue.worker import supervisor

    processes = processes or settings.worker_processes or supervisor.default_processes()
    if processes == 1:
        _run_one(settings)
    else:
        _supervise(settings, processes)


def _supervise(settings: Settings, processes: int) -> None:
    """Run ``processes`` workers under one supervisor and one operations endpoint."""
    from segue.worker import ops
    from segue.worker.supervisor import Supervisor, supervised_command
    from segue.worker.topics import ensure_topics

    database(settings)
    asyncio.run(ensure_topics(settings, kafka(settings)))
    if processes > settings.topic_partitions:
        log.warning("%d workers share topics of %d partitions (SEGUE_TOPIC_PARTITIONS): %d of them will wait idle",
                    processes, settings.topic_partitions, processes - settings.topic_partitions)
    boss = Supervisor(processes, supervised_command())
    url = ops.serve(boss, settings.metrics_host, settings.metrics_port)
    log.info("supervising %d workers; their metrics at %s/metrics, health at %s/healthz and %s/readyz",
             processes, url, url, url)
    boss.run()


def _run_one(settings: Settings) -> None:
    """Run one Faust worker in this process."""
    import faust

    from segue.agents.worker import create_app
    from segue.embedding.engine import EmbeddingEngine
    from segue.worker import ops
    from segue.worker.ops import WorkerState
    from segue.worker.supervisor import write_ops_url
    from segue.worker.topics import ensure_topics

    database_url = database(settings)
    bootstrap = kafka(settings)
    asyncio.run(ensure_topics(settings, bootstrap))
    kafka_logs(settings)
    with connections.connect(settings, database_url) as conn:
        models = registry.live_models(conn)
    engine = EmbeddingEngine.from_settings(settings)
    state = WorkerState(engine, database_url, bootstrap)
    metrics_url = ops.serve(state, settings.metrics_host, settings.metrics_port)
    write_ops_url(metrics_url)
    log.info("metrics at %s/metrics, health at %s/healthz and %s/readyz", metrics_url, metrics_url, metrics_url)
    if not models:
        log.warning("no model is registered yet: documents are stored, vectors come once one is (segue models add)")
    threading.Thread(target=_warm_up, args=(engine, models, state, settings), name="segue-warm-up", daemon=True).start()
    app = create_app(settings, database_url=database_url, engine=engine, state=state, metrics_url=metrics_url)
    faust_worker = faust.Worker(app, loglevel=settings.log_level, override_logging=False)
    faust_worker.spinner = None  # its terminal spinner would write escape codes into the log
    faust_worker.execute_from_commandline()


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
