"""Self-tests of the fault proxy, with a real infinity-emb server behind it."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from segue.devtools.modelkit import minilm_path
from tests.apiserver import FaultProxy, InfinityServer, cls_pooled_copy

SENTENCE = "A heron waits motionless at the edge of the reed bed."


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> InfinityServer:
    """infinity-emb serving MiniLM as "mini" and its CLS-pooled copy as "cls"."""
    work = tmp_path_factory.mktemp("infinity")
    models = {"mini": minilm_path(), "cls": cls_pooled_copy(minilm_path(), work / "minilm-cls")}
    with InfinityServer(models, log_dir=work) as server:
        yield server


@pytest.fixture(scope="module")
def module_proxy(upstream) -> FaultProxy:
    """One proxy in front of ``upstream`` for the module."""
    with FaultProxy(upstream.url) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy) -> FaultProxy:
    """The module's proxy, reset before each test."""
    module_proxy.reset()
    return module_proxy


def embed(base_url: str, model: str = "mini", text: str | list[str] = SENTENCE, path: str = "/embeddings",
          **extra: str) -> httpx.Response:
    """POST an embeddings request; ``extra`` goes into its JSON body."""
    return httpx.post(base_url + path, json={"model": model, "input": text, **extra}, timeout=60)


def vector(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    embedding = response.json()["data"][0]["embedding"]
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.array(embedding, dtype=np.float32)


def test_forwards_and_logs(upstream, proxy):
    direct = vector(embed(upstream.url))
    through = vector(embed(proxy.url, path="/v1/embeddings"))
    assert direct.shape == (384,)
    np.testing.assert_allclose(through, direct, atol=1e-6)
    models = httpx.get(f"{proxy.url}/v1/models", timeout=10).json()
    assert {model["id"] for model in models["data"]} == {"mini", "cls"}
    [record, listing] = proxy.records()
    assert (record.path, record.model, record.inputs, record.texts) == ("/v1/embeddings", "mini", 1, [SENTENCE])
    assert (record.input_chars, record.status, record.fault) == (len(SENTENCE), 200, None)
    assert (listing.path, listing.status) == ("/v1/models", 200)


def test_injected_faults_and_rules(proxy):
    proxy.inject("rate_limited", retry_after=7)
    proxy.inject("wrong_dimension", times=2)
    limited = embed(proxy.url)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert vector(embed(proxy.url, encoding_format="float")).shape == (383,)
    assert vector(embed(proxy.url, encoding_format="base64")).shape == (383,)
    assert vector(embed(proxy.url, text=[SENTENCE, "second"])).shape == (384,)
    proxy.reject_inputs_longer_than(20)
    assert embed(proxy.url).json()["error"]["code"] == "context_length_exceeded"
    proxy.expected_key = "sk-test"
    assert embed(proxy.url).json()["error"]["code"] == "invalid_api_key"
    assert [r.fault for r in proxy.records()] == [
        "rate_limited", "wrong_dimension", "wrong_dimension", None, "context_length", "unauthorized"]
    assert [r.status for r in proxy.records()] == [429, 200, 200, 200, 400, 401]


def test_model_swap_is_hidden(upstream, proxy):
    mini = vector(embed(proxy.url))
    proxy.rewrite_model({"mini": "cls"})
    swapped = embed(proxy.url)
    assert swapped.json()["model"] == "mini"
    np.testing.assert_allclose(vector(swapped), vector(embed(upstream.url, model="cls")), atol=1e-6)
    assert float(mini @ vector(swapped)) < 0.9  # both are unit vectors
    assert proxy.records()[-1].fault == "swapped"
