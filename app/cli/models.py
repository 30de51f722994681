"""``segue models``: register, bind and list embedding models."""

from __future__ import annotations

import json

import click
from rich.table import Table

from segue.cli.common import (
    OPTION_OPTION,
    PROVIDER_OPTION,
    chunking_options,
    console,
    control,
    model_source,
    provider_options,
)
from segue.control import registry
from segue.embedding import providers
from segue.settings import Settings


@click.group()
def models() -> None:
    """Register and list embedding models."""


@models.command("add")
@click.argument("name")
@click.option("--source", help="a local model folder, a cached hub id, or a bundled model: bundled:minilm-static-256 "
                               "or bundled:all-minilm-l6-v2")
@click.option("--base-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (provider openai)")
@click.option("--model", "api_model", help="the endpoint's model name, e.g. text-embedding-3-small")
@click.option("--dimensions", type=int, help="vector width the endpoint is asked for (text-embedding-3 models)")
@click.option("--api-key-env", help="the environment variable holding the API key [default: OPENAI_API_KEY]")
@PROVIDER_OPTION
@OPTION_OPTION
@chunking_options
@click.pass_obj
def models_add(settings: Settings, name: str, source: str | None, base_url: str | None, api_model: str | None,
               dimensions: int | None, api_key_env: str | None, provider: str | None,
               option_pairs: tuple[str, ...], chunking: dict | None) -> None:
    """Register model NAME: compute its dim and fingerprint and add its columns.

    A local model comes from --source; a model behind an API from --base-url and --model
    (its key is read from the environment variable --api-key-env names, never stored).
    With --chunk-size (or another chunking option) it embeds chunks of each document into
    its own chunk table, and searches rank documents by their best chunk. From then on every change is embedded with it too; running workers pick it up.
    """
    options = provider_options(option_pairs)
    if base_url is not None:
        if source is not None:
            raise click.UsageError("give --source (a local model) or --base-url (an API), not both")
        source, provider = base_url, provider or "openai"
        api = {"model": api_model, "dimensions": dimensions, "api_key_env": api_key_env}
        options |= {key: value for key, value in api.items() if value is not None}
    elif source is None or api_model or dimensions or api_key_env:
        raise click.UsageError("give --source (a local model folder, a hub id or bundled:NAME), or --base-url with "
                               "--model, --dimensions and --api-key-env (a model behind an API)")
    else:
        source = model_source(settings, source)
    spec = control(settings, registry.register_model, name=name, source=source, provider=provider,
                    options=options, chunking=chunking)
    console.print(
        f"registered [bold]{spec.name}[/] as v{spec.version}: {spec.provider}, {spec.dim}-d, "
        f"{json.dumps(providers.shown_config(spec.config))}, fingerprint {spec.fingerprint[:16]}…; "
        f"columns embedding_v{spec.version}, embedding_v{spec.version}_sha256"
        + (f"; chunk table chunks_v{spec.version}" if spec.chunked else "")
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
        spec, cosine = control(settings, registry.bind_model, engine=engine, name=name,
                                source=model_source(settings, source),
                                provider=provider, options=provider_options(option_pairs))
    finally:
        engine.close()
    console.print(f"bound [bold]{spec.name}[/] to {spec.provider} ({spec.source}): its vectors are reproduced "
                  f"(lowest cosine {cosine:.5f}); workers now embed changes with it")


@models.command("list")
@click.pass_obj
def models_list(settings: Settings) -> None:
    """List registered models."""
    rows = control(settings, registry.list_models, read_only=True)
    table = Table(title="embedding_models")
    for header in ("v", "name", "provider", "dim", "max tokens", "config", "state", "reads", "fingerprint", "source"):
        table.add_column(header)
    for m in rows:
        s = m.spec
        table.add_row(str(s.version), s.name, s.provider, str(s.dim), str(s.max_tokens),
                      json.dumps(providers.shown_config(s.config)),
                      m.state, "✓" if m.serving_reads else "", s.fingerprint[:16], s.source)
    console.print(table)
