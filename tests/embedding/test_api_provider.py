"""Provider ``openai`` against a real OpenAI-compatible server (infinity-emb serving the bundled MiniLM), through
our fault-injecting proxy: vectors, request packing, truncation, retries by error class, budgets, a refused
key, a rejected input and a model swapped behind its name. Nothing here mocks the HTTP client or the server.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from segue import metrics
from segue.devtools.corpus import scifact_documents
from segue.devtools.modelkit import minilm_path
from segue.embedding import providers
from segue.embedding.providers.openai import CANARY_TEXTS
from segue.errors import InputRejected, ModelHalted
from segue.spec import ModelSpec
from tests.apiserver import FaultProxy

SERVED = "minilm"  # as the session's infinity fixture serves them (tests/conftest.py)
SWAPPED = "minilm-cls"


@pytest.fixture
def proxy(infinity):
    proxy = FaultProxy(infinity.url).start()
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def local(engine) -> ModelSpec:
    """The same MiniLM run here by the transformer provider: the reference vectors."""
    return ModelSpec.from_profile(100, "local", str(minilm_path()), providers.inspect(str(minilm_path())))


def register(url: str, version: int, **options) -> ModelSpec:
    """Inspect the served MiniLM as an API model, as ``segue models add`` does."""
    options = {"model": SERVED, "tokenizer": str(minilm_path()), "max_tokens_per_input": 256, **options}
    return ModelSpec.from_profile(version, f"api-{version}", url, providers.inspect(url, provider="openai",
                                                                                   options=options))


def abstracts(count: int) -> list[str]:
    return [document.text for document in scifact_documents(count)]


def embedding_requests(proxy: FaultProxy) -> list:
    """The proxy's log of embedding requests, without the canary checks."""
    return [r for r in proxy.records() if r.path.endswith("embeddings") and tuple(r.texts) != CANARY_TEXTS]


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert float((got * expected).sum(axis=1).min()) >= 0.999


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_api_vectors_match_the_local_model_within_the_request_limits(proxy, engine, local, tokenizer,
                                                                     encoding_format):
    texts = abstracts(48)
    version = {"float": 1, "base64": 2}[encoding_format]
    spec = register(proxy.url, version, encoding_format=encoding_format, max_inputs_per_request=8,
                    max_tokens_per_request=1024)
    assert (spec.provider, spec.dim, spec.max_tokens) == ("openai", 384, 256)
    proxy.clear()

    embedded = asyncio.run(engine.embed_counted(spec, texts, priority=1))

    assert_same_vectors(embedded.vectors, engine.embed_sync(local, texts))
    requests = embedding_requests(proxy)
    assert sum(r.inputs for r in requests) == len(texts) and all(r.status == 200 for r in requests)
    assert max(r.inputs for r in requests) <= 8
    sent_tokens = [[len(e.ids) for e in tokenizer.encode_batch(r.texts)] for r in requests]
    assert max(sum(counts) for counts in sent_tokens) <= 1024  # the token budget packs fewer than 8 long texts
    assert min(r.inputs for r in requests[:-1]) < 8
    assert max(max(counts) for counts in sent_tokens) <= 256  # long texts were cut here, not by the server
    long_texts = [count for count in embedded.tokens if count > 256]
    assert long_texts and max(embedded.tokens_used(spec)) == 256


def test_faults_are_retried_by_class_and_requests_keep_to_the_budgets(proxy, engine, local, tokenizer, caplog):
    spec = register(proxy.url, 3, timeout_s=2, requests_per_minute=240, tokens_per_minute=30_000,
                    max_inputs_per_request=4, max_tokens_per_request=1024, concurrency=2)
    faults = {"rate_limited": {"retry_after": 1}, "unavailable": {"retry_after": 1}, "server_error": {},
              "slow": {"delay_s": 5}, "malformed": {}, "wrong_dimension": {}}
    for kind, params in faults.items():
        proxy.inject(kind, **params)
    texts = abstracts(40)

    with caplog.at_level(logging.WARNING, logger="segue.embedding.providers.api"):
        embedded = asyncio.run(engine.embed_counted(spec, texts, priority=2))

    assert_same_vectors(embedded.vectors, engine.embed_sync(local, texts))  # nothing lost to a fault
    records = proxy.records()
    assert {r.fault for r in records if r.fault} == set(faults)
    for logged in ("rate_limited: HTTP 429", "server_error: HTTP 503", "server_error: HTTP 500", "timeout",
                   "malformed", "wrong_dimension: 383-d"):
        assert logged in caplog.text
    limited = next(r for r in records if r.fault == "rate_limited")
    retried = next(r for r in records if r.at > limited.at and r.texts == limited.texts)
    assert retried.at - limited.at >= 1.0  # Retry-After honoured

    # The budgets, from the proxy's own log: 240 requests/min is one request each 250 ms at most;
    # 30,000 tokens/min with 1,024-token requests is at most 1,024 tokens in any 2.048 s.
    arrivals = sorted(r.at for r in records)
    assert all(sum(1 for t in arrivals if start <= t < start + 1.0) <= 5 for start in arrivals)
    sent = sorted((r.at, sum(len(e.ids) for e in tokenizer.encode_batch(r.texts))) for r in records if r.texts)
    assert all(sum(n for t, n in sent if start <= t < start + 2.0) <= 2 * 1024 for start, _ in sent)
    span = sent[-1][0] - sent[0][0]
    assert sum(n for _, n in sent[:-1]) / span <= 30_000 / 60 * 1.1


def test_a_refused_key_halts_the_model_at_once_and_never_shows_the_key(proxy, engine, caplog, monkeypatch):
    monkeypatch.setenv("SEGUE_TEST_API_KEY", "the-right-key")
    spec = register(proxy.url, 4, api_key_env="SEGUE_TEST_API_KEY")
    assert "the-right-key" not in str(spec.config)
    proxy.expected_key = "the-right-key"
    monkeypatch.setenv("SEGUE_TEST_API_KEY", "sk-wrong-secret-4242")
    proxy.clear()

    with caplog.at_level(logging.INFO), pytest.raises(ModelHalted, match="refused the API key in"):
        engine.embed_sync(spec, ["a text"])
    assert [r.status for r in proxy.records()] == [401]  # not retried
    with pytest.raises(ModelHalted):
        engine.embed_sync(spec, ["another text"])
    assert len(proxy.records()) == 1  # a halted model sends nothing
    assert "api-4" in engine.halted()
    assert metrics.MODEL_HALTED.labels("api-4", "auth")._value.get() == 1
    assert "sk-wrong-secret-4242" not in caplog.text + str(engine.halted())


def test_a_request_rejected_for_one_input_is_split_until_that_input_is_alone(proxy, engine):
    spec = register(proxy.url, 5)
    texts = [f"a short text, number {i}" for i in range(7)] + ["word " * 400]
    proxy.reject_inputs_longer_than(300)
    proxy.clear()

    with pytest.raises(InputRejected, match="too_long"):
        engine.embed_sync(spec, texts)

    requests = embedding_requests(proxy)
    assert [r.inputs for r in requests if r.fault == "context_length"] == [8, 4, 2, 1]
    assert sum(r.inputs for r in requests if r.status == 200) == 7


def test_a_model_swapped_behind_its_name_halts_on_its_canaries(proxy, engine):
    spec = register(proxy.url, 6, canary_every_s=0.5)
    engine.embed_sync(spec, ["before the swap"])
    proxy.rewrite_model({SERVED: SWAPPED})
    time.sleep(0.6)

    with pytest.raises(ModelHalted, match="canary texts changed"):
        engine.embed_sync(spec, ["after the swap"])

    assert "segue migrate start" in engine.halted()["api-6"]
    assert metrics.MODEL_HALTED.labels("api-6", "canary_drift")._value.get() == 1
    assert not any("after the swap" in r.texts for r in proxy.records())  # nothing embedded by the other model


def test_shortened_vectors_are_the_local_model_s_leading_dimensions(proxy, engine, local):
    spec = register(proxy.url, 7, dimensions=128)
    texts = abstracts(8)

    assert spec.dim == 128
    leading = engine.embed_sync(local, texts)[:, :128]
    assert_same_vectors(engine.embed_sync(spec, texts), leading / np.linalg.norm(leading, axis=1, keepdims=True))
    assert spec.fingerprint != register(proxy.url, 8).fingerprint
