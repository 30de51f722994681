"""The ``segue`` command line: one module per command or command group, all sharing ``segue.cli.common``.

Commands that only read (``status``, ``models list``, ``migrate status``) run no DDL and
change no state, and none of the commands that do not embed imports model code (torch).
"""

from __future__ import annotations

import os

# Read when tqdm and transformers are imported: no per-load progress bars or load reports in logs.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click  # noqa: E402

from segue.cli import (  # noqa: E402
    backfill,
    database,
    demo,
    dlq,
    evaluate,
    imports,
    migrate,
    models,
    publish,
    services,
    status,
    worker,
)
from segue.cli.common import configure_logging  # noqa: E402
from segue.settings import load_settings  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Segue: migrate a pgvector corpus between embedding models with zero downtime.

    Settings come from SEGUE_* environment variables; with SEGUE_KAFKA_URL and
    SEGUE_DATABASE_URL unset, embedded services are started and used.
    """
    ctx.obj = load_settings()
    configure_logging(ctx.obj)


for command in (worker.worker, models.models, status.status, migrate.migrate, backfill.backfill,
                services.services_command, evaluate.eval_command, imports.import_command, publish.publish_command,
                dlq.dlq, database.db_group, demo.demo):
    main.add_command(command)
