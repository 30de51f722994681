"""The ``segue`` command line: one module per command or command group, all sharing ``segue.cli.common``.

Commands that only read (``status``, ``models list``, ``migrate status``) run no DDL and
change no state, and none of the commands that do not embed imports model code (torch).
Every command runs inside one error boundary (:class:`SegueGroup`): a failure a user can
meet prints one line saying what happened and what to do, and exits 1.
"""

from __future__ import annotations

import os

# Read when tqdm and transformers are imported: no per-load progress bars or load reports in logs.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click  # noqa: E402

from segue.cli import (  # noqa: E402
    adapter,
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
from segue.cli.common import configure_logging, failure_line  # noqa: E402
from segue.settings import load_settings  # noqa: E402


class SegueGroup(click.Group):
    """The one error boundary: a known failure becomes one line on stderr and exit status 1.

    With ``segue --debug`` or ``SEGUE_LOG_LEVEL=debug`` it is raised instead, traceback and all.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            line = failure_line(error, ctx.obj)
            if line is None or _debugging(ctx):
                raise
            raise click.ClickException(line) from None


def _debugging(ctx: click.Context) -> bool:
    settings = ctx.obj
    level = settings.log_level if settings is not None else os.environ.get("SEGUE_LOG_LEVEL", "")
    return bool(ctx.params.get("debug")) or level.lower() == "debug"


@click.group(cls=SegueGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="log at debug level and show a failure's traceback")
@click.version_option(package_name="segue", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Segue: migrate a pgvector corpus between embedding models with zero downtime.

    Settings come from SEGUE_* environment variables; with SEGUE_KAFKA_URL and
    SEGUE_DATABASE_URL unset, the embedded services (segue services up) are used.
    """
    settings = load_settings()
    ctx.obj = settings.model_copy(update={"log_level": "debug"}) if debug else settings
    configure_logging(ctx.obj)


for command in (worker.worker, models.models, status.status, migrate.migrate, backfill.backfill,
                services.services_command, evaluate.eval_command, imports.import_command, publish.publish_command,
                dlq.dlq, database.db_group, demo.demo, adapter.adapter_group):
    main.add_command(command)
