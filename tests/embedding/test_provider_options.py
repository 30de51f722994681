"""Typed provider options (segue.embedding.providers.options): the models, and their refusals through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from segue.embedding import providers
from segue.embedding.providers import OptionsError
from segue.embedding.providers import openai as api
from segue.embedding.providers.options import (
    OpenAIOptions,
    StaticOptions,
    TransformerOptions,
    from_config,
    parse,
)
from tests import modelfactory

API = "http://127.0.0.1:9/v1"  # nothing listens here: a refused option is refused before any request

REFUSED = [
    ("transformer", {"dtype": "half"}, "option dtype: must be one of float32, float16, bfloat16, not 'half'"),
    ("transformer", {"attention": "flash"}, "option attention: must be one of sdpa, eager, not 'flash'"),
    ("transformer", {"prefix": True}, "option prefix: must be text, not True"),
    ("transformer", {"colour": "red", "provider": "static"},
     "provider 'transformer' takes no option colour, provider (it takes: attention, dtype, prefix)"),
    ("static", {"dtype": "float16"}, "provider 'static' takes no option dtype (it takes: none)"),
    ("openai", {}, "provider 'openai' needs option model: the endpoint's model name (--model), "
                   "e.g. text-embedding-3-small"),
    ("openai", {"model": ""}, "option model: must be the endpoint's model name (--model), "
                              "e.g. text-embedding-3-small, not ''"),
    ("openai", {"model": "m", "timeout_s": "abc"}, "option timeout_s: must be a positive number, not 'abc'"),
    ("openai", {"model": "m", "timeout_s": 0}, "option timeout_s: must be a positive number, not 0"),
    ("openai", {"model": "m", "requests_per_minute": True}, "option requests_per_minute: must be a positive number, "
                                                           "not True"),
    ("openai", {"model": "m", "concurrency": 2.5}, "option concurrency: must be a positive integer, not 2.5"),
    ("openai", {"model": "m", "dimensions": -3}, "option dimensions: must be a positive integer, not -3"),
    ("openai", {"model": "m", "truncate": "start"}, "option truncate: must be one of end, refuse, not 'start'"),
    ("openai", {"model": "m", "encoding_format": "hex"}, "option encoding_format: must be one of float, base64, "
                                                         "not 'hex'"),
    ("openai", {"model": "m", "price_per_million_tokens": -1}, "option price_per_million_tokens: must be a price "
                                                               "in USD, 0 or more, not -1"),
    ("openai", {"model": "m", "max_tokens_per_input": 4096, "max_tokens_per_request": 1024},
     "option max_tokens_per_input (4096) cannot exceed max_tokens_per_request (1024)"),
    ("openai", {"model": "m", "tokenizer": ["a"]}, "option tokenizer: must be tiktoken:<encoding>, a tokenizer folder "
                                                   "or a cached hub id, not ['a']"),
]


@pytest.mark.parametrize(("provider", "options", "message"), REFUSED)
def test_a_wrong_option_is_refused_naming_it_and_what_it_takes(provider, options, message):
    with pytest.raises(OptionsError) as refused:
        parse(provider, options)
    assert str(refused.value) == message


def test_a_key_given_as_the_key_variable_is_refused_without_echoing_it():
    with pytest.raises(OptionsError) as refused:
        parse("openai", {"model": "m", "api_key_env": "sk-proj-Abc123Def456"})
    assert str(refused.value) == "option api_key_env: must be the name of an environment variable (--api-key-env)"


def test_values_are_coerced_where_it_is_sensible_and_kept_as_given():
    options = parse("openai", {"model": "m", "timeout_s": "3", "max_inputs_per_request": "8", "concurrency": 2.0,
                               "requests_per_minute": 0.5, "outage_after_s": 20, "price_per_million_tokens": "0.02"})
    assert isinstance(options, OpenAIOptions)
    assert (options.timeout_s, options.max_inputs_per_request, options.concurrency) == (3, 8, 2)
    assert (options.requests_per_minute, options.outage_after_s, options.price_per_million_tokens) == (0.5, 20, 0.02)
    assert type(options.outage_after_s) is int and type(options.timeout_s) is int  # stored as given: 20, not 20.0
    assert parse("transformer", {"prefix": 42}).prefix == "42"  # --option prefix=42 means the text


def test_the_models_dump_what_the_registry_has_always_stored():
    assert providers.PROVIDERS == ("transformer", "static", "openai")
    assert parse("transformer", {}).model_dump() == {"dtype": "float32", "attention": "sdpa", "prefix": ""}
    assert parse("transformer", {"dtype": "float32", "prefix": "q: "}).model_dump(exclude_defaults=True) == {
        "prefix": "q: "}
    assert isinstance(parse("static", {}), StaticOptions) and parse("static", {}).model_dump() == {}
    assert list(parse("openai", {"model": "m"}).model_dump()) == [
        "model", "dimensions", "api_key_env", "encoding_format", "tokenizer", "max_tokens_per_input", "truncate",
        "max_inputs_per_request", "max_tokens_per_request", "requests_per_minute", "tokens_per_minute", "concurrency",
        "timeout_s", "outage_after_s", "price_per_million_tokens", "batch_price_per_million_tokens", "canary_every_s"]


def test_a_registered_config_gives_back_its_options():
    stored = {"pooling": "cls", "normalize": True, "dtype": "bfloat16", "attention": "eager", "prefix": "passage: "}
    assert from_config("transformer", stored) == TransformerOptions(dtype="bfloat16", attention="eager",
                                                                    prefix="passage: ")
    api_config = {**parse("openai", {"model": "m", "timeout_s": 2}).model_dump(), "canary_vectors": "AAAA",
                  "adopted_from": "legacy"}
    assert from_config("openai", api_config) == parse("openai", {"model": "m", "timeout_s": 2})


# Registrations made before options were typed: what the registry stored, and the fingerprint it recorded.
BEFORE = [
    ("https://api.openai.com/v1", {"model": "text-embedding-3-small"},
     "482f7b26f77be6bf7b94aab15def21e2c29a1380fc1324e963924db0fc3eeddf",
     {"api_key_env": "OPENAI_API_KEY", "price_per_million_tokens": 0.02, "batch_price_per_million_tokens": 0.01}),
    ("https://api.openai.com/v1", {"model": "text-embedding-3-large", "dimensions": 256,
                                   "batch_price_per_million_tokens": 0.05},
     "1984ca17a4635bd6bd5b0b055392801ed89af3144789e3176f9e4c5536fa1b66",
     {"api_key_env": "OPENAI_API_KEY", "price_per_million_tokens": 0.13, "batch_price_per_million_tokens": 0.05}),
    ("http://localhost:7997/v1", {"model": "minilm", "tokenizer": "/x/minilm", "max_tokens_per_input": 256,
                                  "timeout_s": 2, "outage_after_s": 20, "truncate": "refuse",
                                  "max_inputs_per_request": 8, "price_per_million_tokens": 0.01, "canary_every_s": 2,
                                  "requests_per_minute": 0.5},
     "26d38291c8605fb23dc25514c7c7f4d5dd7ee39fc6474afc93411f7709d1f668",
     {"api_key_env": None, "price_per_million_tokens": 0.01, "batch_price_per_million_tokens": None}),
]


@pytest.mark.parametrize(("source", "options", "recorded", "defaults"), BEFORE)
def test_an_api_models_config_and_identity_are_what_they_were(source, options, recorded, defaults):
    canaries = np.random.default_rng(0).standard_normal((8, 24)).astype(np.float32)
    canaries /= np.linalg.norm(canaries, axis=1, keepdims=True)
    profile = api._profile(source, api._settings(parse("openai", options), source), canaries)
    assert profile.fingerprint == recorded
    assert {key: profile.config[key] for key in defaults} == defaults
    assert {key: profile.config[key] for key in options} == options
    # Loaded back from what was stored, the settings give the same identity (the engine compares it).
    reloaded = api._settings(from_config("openai", profile.config), source)
    assert api._profile(source, reloaded, canaries).fingerprint == recorded


# -- through the CLI: exit 1, one line naming the option, nothing registered ------------------------------------

def refusal(done) -> str:
    """The one line a refused command printed, after checking it printed nothing else (no traceback)."""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[")]  # log lines start with [time]
    assert done.returncode == 1 and lines and len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(("source", "arguments", "message"), [
    ("transformer", ["--option", "dtype=half"], "option dtype: must be one of float32, float16, bfloat16, not 'half'"),
    ("transformer", ["--option", "colour=red"],
     "provider 'transformer' takes no option colour (it takes: attention, dtype, prefix)"),
    ("static", ["--option", "prefix=q"], "provider 'static' takes no option prefix (it takes: none)"),
    ("api", ["--model", "m", "--option", "timeout_s=abc"], "option timeout_s: must be a positive number, not 'abc'"),
    ("api", ["--model", "m", "--option", "concurrency=2.5"], "option concurrency: must be a positive integer, not 2.5"),
    ("api", ["--model", "m", "--dimensions", "0"], "option dimensions: must be a positive integer, not 0"),
    ("api", ["--model", "m", "--option", "truncate=start"], "option truncate: must be one of end, refuse, not 'start'"),
    ("api", [], "provider 'openai' needs option model: the endpoint's model name (--model), "
                "e.g. text-embedding-3-small"),
    ("api", ["--model", "m", "--api-key-env", "sk-proj-Abc123Def456"],
     "option api_key_env: must be the name of an environment variable (--api-key-env)"),
])
def test_models_add_refuses_a_wrong_option_in_one_line(harness, model_cache, source, arguments, message):
    where = {"transformer": ["--source", str(modelfactory.tiny_transformer_a(model_cache))],
             "static": ["--source", str(modelfactory.tiny_static(model_cache))],
             "api": ["--base-url", API]}[source]
    done = harness.segue("models", "add", "refused-model", *where, *arguments, check=False)
    assert refusal(done) == f"Error: {message}"
    assert "sk-proj" not in done.stdout + done.stderr
    assert harness.scalar("SELECT count(*) FROM embedding_models WHERE name = 'refused-model'") == 0


def test_migrate_plan_and_start_refuse_a_wrong_option_in_one_line(harness, model_cache):
    source = str(modelfactory.tiny_transformer_a(model_cache))
    migrations = harness.scalar("SELECT count(*) FROM migrations")
    plan = harness.segue("migrate", "plan", "--to", "refused-model", "--source", source, "--option", "dtype=half",
                         check=False)
    assert refusal(plan) == "Error: option dtype: must be one of float32, float16, bfloat16, not 'half'"
    start = harness.segue("migrate", "start", "--to", "refused-model", "--source", source,
                          "--option", "attention=flash", check=False)
    assert refusal(start) == "Error: option attention: must be one of sdpa, eager, not 'flash'"
    assert harness.scalar("SELECT count(*) FROM migrations") == migrations
    assert harness.scalar("SELECT count(*) FROM embedding_models WHERE name = 'refused-model'") == 0


def test_an_architecture_without_sdpa_registers_with_eager_attention_unless_sdpa_is_asked_for(harness, tmp_path):
    """MPNet (all-mpnet-base-v2's architecture) has no SDPA kernel in transformers: the default loads it eagerly (the
    same math; its identity and the config the registry stores say so), and asking for sdpa by name is refused in
    one line (before, both were a 30-line traceback)."""
    from segue.devtools.modelkit import build_tiny_transformer

    source = str(build_tiny_transformer(tmp_path / "tiny-mpnet", architecture="mpnet"))
    profile = providers.inspect(source)
    assert profile.config["attention"] == "eager" and profile.dim == 32
    assert profile.fingerprint != providers.inspect(source, options={"attention": "eager", "dtype": "float16"}).fingerprint
    refused = harness.segue("models", "add", "tiny-mpnet-sdpa", "--source", source, "--option", "attention=sdpa",
                            check=False)
    assert refusal(refused) == (f"Error: option attention: {source} has no sdpa attention in transformers: "
                                "use --option attention=eager")
    assert harness.scalar("SELECT count(*) FROM embedding_models WHERE name LIKE 'tiny-mpnet%'") == 0
