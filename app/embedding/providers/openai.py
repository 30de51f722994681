"""Provider ``openai``: a model behind any OpenAI-compatible ``/embeddings`` endpoint.

OpenAI itself, and the self-hosted servers that speak its API (TEI, vLLM, Ollama,
Infinity). The source is the endpoint's base URL (``https://api.openai.com/v1``);
options (:class:`~segue.embedding.providers.options.OpenAIOptions`), set at registration
(``segue models add NAME --provider openai --model M --base-url URL``, others with
``--option KEY=VALUE``):

* ``model`` (required) and ``dimensions`` (sent when set: text-embedding-3 models shorten
  their vectors);
* ``api_key_env``: the environment variable holding the key (default ``OPENAI_API_KEY`` for
  api.openai.com, none elsewhere, so an OpenAI key is never sent to another host). The key
  itself is never stored, logged or printed;
* ``tokenizer``: how texts are counted and cut: ``tiktoken:<encoding>`` (default
  ``tiktoken:cl100k_base``, OpenAI's) or a local tokenizer folder or cached hub id;
* ``max_tokens_per_input`` and ``truncate`` (``end``: cut the text to the limit and count
  it; ``refuse``: dead-letter it), so the server never cuts a text silently;
* the endpoint's limits (``max_inputs_per_request``, ``max_tokens_per_request``,
  ``requests_per_minute``, ``tokens_per_minute``, ``concurrency``, ``timeout_s``,
  ``outage_after_s``), OpenAI's published ones by default;
* prices in USD per 1M tokens (``price_per_million_tokens``, ``batch_price_per_million_tokens``;
  OpenAI's list prices for its models by default), for ``migrate plan`` and ``backfill --max-usd``;
* ``canary_every_s``: how often a worker re-checks the canaries (default hourly).

An API model's weights are invisible, so its identity is the provider, the endpoint's
host, the model name, its dimensions, its input limit and truncation, and the vectors
of fixed canary texts recorded at registration. A worker embeds the canaries again
before its first request and every ``canary_every_s``; when one falls below cosine
:data:`CANARY_MIN_COSINE` of its recorded vector (or gives no usable vector) the model
behind the name has changed, and the worker stops writing it
(:class:`~segue.errors.ModelHalted`) until it is registered again. A refused key, or an
endpoint that refuses even one canary text alone, halts it the same way. A text the
endpoint refuses alone, or over the input limit with ``truncate=refuse``, is rejected
on its own (:data:`~segue.embedding.providers.api_client.Rejections`); the others are embedded.

The base URL may not carry credentials (``user:password@``): they would be stored and
shown with it. The key comes from the environment only.

Requests run on the embedder's own event loop thread (see ``api_client``), so HTTP waits
never block the engine's model thread or the worker's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from segue import metrics
from segue.embedding.providers.api_client import EmbeddingsClient, Limits, Rejections
from segue.embedding.providers.base import OptionsError, Prepared, fingerprint, resolve_source
from segue.embedding.providers.options import OpenAIOptions, from_config
from segue.errors import ModelHalted, ProviderError
from segue.spec import ModelProfile, ModelSpec

log = logging.getLogger("segue.embedding.providers.openai")

NAME = "openai"
CANARY_MIN_COSINE = 0.999
PROBE_EVERY_S = 10.0  # after an outage, requests fail at once for this long before one tries again
CANARY_TEXTS = (
    "Segue checks that the model behind an API name has not changed.",
    "The mitochondria is the powerhouse of the cell.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions.",
    "def add(a, b):\n    return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "42",
)
PROBE_TEXT = CANARY_TEXTS[-1]  # sent alone to tell an endpoint that refuses everything from a refused input
# OpenAI's list prices in USD per 1M input tokens (the Batch API costs half).
LIST_PRICES = {"text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13, "text-embedding-ada-002": 0.10}
IDENTITY = ("model", "dimensions", "max_tokens_per_input", "truncate", "tokenizer")


def inspect(source: str, options: OpenAIOptions) -> ModelProfile:
    """Embed the canary texts at ``source`` and profile the model: its dim, and the canaries as its identity."""
    settings = _settings(options, source)
    if settings.api_key_env and not os.environ.get(settings.api_key_env):
        raise OptionsError(f"the API key is read from ${settings.api_key_env}, which is not set")
    probe = ApiEmbedder(None, source, settings, label=settings.model, canaries=None)
    try:
        vectors, _, rejected = probe.submit(list(CANARY_TEXTS), 0).result()
    finally:
        probe.close()
    unusable = {**rejected, **{i: "all-zero vector" for i, norm in enumerate(np.linalg.norm(vectors, axis=1))
                                if norm == 0 and i not in rejected}}
    if unusable:
        i = min(unusable)
        raise OptionsError(f"{source} gives no usable vector for the canary text {CANARY_TEXTS[i]!r}: {unusable[i]}")
    if settings.dimensions and vectors.shape[1] != settings.dimensions:
        raise OptionsError(f"{source} answered {vectors.shape[1]}-d vectors for dimensions={settings.dimensions}")
    return _profile(source, settings, _unit(vectors))


def load(spec: ModelSpec, device: str | None) -> ApiEmbedder:
    """The registered model, ready to send requests (``device`` does not apply: the endpoint computes)."""
    settings = _settings(from_config(NAME, spec.config), spec.source)
    canaries = _decode_canaries(spec.config["canary_vectors"], spec.dim)
    return ApiEmbedder(_profile(spec.source, settings, canaries), spec.source, settings, label=spec.name,
                       canaries=canaries)


class ApiEmbedder:
    """A registered API model: counts and cuts texts here, sends them on its own event loop thread."""

    remote = True  # the engine awaits submit() instead of running embed() on its model thread

    def __init__(self, profile: ModelProfile | None, source: str, settings: OpenAIOptions, *, label: str,
                 canaries: np.ndarray | None):
        self.profile = profile
        self._host = _host(source)
        self.device = f"api:{self._host}"
        self.halted: str | None = None  # why Segue stopped writing this model (None: it did not)
        self._label = label
        self._settings = settings
        self._canaries = canaries
        self._checked_at: float | None = None
        self._down_until = 0.0
        self._down_error: ProviderError | None = None
        self._tokenizer = _Tokenizer(settings.tokenizer)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"segue-api-{label}", daemon=True)
        self._thread.start()
        self._client = EmbeddingsClient(
            base_url=source, model=settings.model, dimensions=settings.dimensions,
            api_key=os.environ.get(settings.api_key_env) if settings.api_key_env else None,
            encoding_format=settings.encoding_format, label=label, dim=profile.dim if profile else None,
            probe=(PROBE_TEXT, self._tokenizer.count([PROBE_TEXT])[0]),
            limits=Limits(**{field: getattr(settings, field) for field in (
                "max_inputs_per_request", "max_tokens_per_request", "requests_per_minute", "tokens_per_minute",
                "concurrency", "timeout_s", "outage_after_s")}))
        self._canary_lock = asyncio.Lock()

    @property
    def billed_tokens(self) -> int:
        """Tokens of every request the endpoint answered so far, canaries and discarded answers included."""
        return self._client.billed_tokens

    def prepare(self, texts: Sequence[str]) -> Prepared:
        return Prepared(self._tokenizer.count(texts), list(texts))

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return [self._tokenizer.spans(text) for text in texts]

    def embed(self, prepared: Prepared) -> np.ndarray:
        return self.submit(prepared.inputs, 0).result()[0]

    def submit(self, texts: Sequence[str], priority: int) -> concurrent.futures.Future:
        """A future (settled from any thread) of the raw vectors, each text's token count before truncation, and
        the texts the model gives no usable vector (index: why; their rows are zeros)."""
        return asyncio.run_coroutine_threadsafe(self._embed(list(texts), priority), self._loop)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _embed(self, texts: list[str], priority: int) -> tuple[np.ndarray, list[int], Rejections]:
        if self.halted:
            raise ModelHalted(self.halted)
        if time.monotonic() < self._down_until and self._down_error is not None:
            raise ProviderError(self._down_error.kind, f"the endpoint is failing ({self._down_error}); "
                                f"next try in {self._down_until - time.monotonic():.0f}s")
        try:
            await self._check_canaries_if_due()
            totals = await asyncio.to_thread(self._tokenizer.count, texts)
            sent, inputs, used, rejected = self._fit(texts, totals)
            vectors, refused = await self._client.embed(inputs, used, priority=priority)
        except ProviderError as error:
            if not error.retryable:
                self._halt_refused(error)
            self._down_until, self._down_error = time.monotonic() + PROBE_EVERY_S, error
            raise
        self._down_error = None
        rejected |= {sent[i]: why for i, why in refused.items()}
        if len(sent) == len(texts):
            return vectors, totals, rejected
        every = np.zeros((len(texts), vectors.shape[1] if len(sent) else self._width()), dtype=np.float32)
        every[sent] = vectors
        return every, totals, rejected

    def _width(self) -> int:
        return self.profile.dim if self.profile else 0

    def _halt_refused(self, error: ProviderError) -> None:
        """Halt the model for an answer no retry can change (a refused key, an endpoint that refuses everything)."""
        if error.kind == "auth":
            variable = self._settings.api_key_env
            where = f"the API key in ${variable}" if variable else "requests without a key (no --api-key-env)"
            self._halt("auth", f"model {self._label!r}: the endpoint refused {where} ({error}); Segue stopped "
                               "writing this model: set a valid key and restart the worker")
        else:
            self._halt(error.kind, f"model {self._label!r}: the endpoint at {self._host} {error.detail}; Segue stopped "
                                   "writing this model: fix the endpoint or the registration (segue models list "
                                   "shows it), then restart the worker")
        raise ModelHalted(self.halted) from None

    def _fit(self, texts: list[str], totals: list[int]) -> tuple[list[int], list[str], list[int], Rejections]:
        """The texts to send, cut to the input limit by the registered policy: (their indexes, the texts, the
        tokens each is sent with, the texts refused here because ``truncate=refuse``)."""
        limit = self._settings.max_tokens_per_input
        refuse = self._settings.truncate == "refuse"
        rejected = {i: f"too_long: a text of {count} tokens is over model {self._label!r}'s {limit}-token input limit"
                       " (truncate=refuse)" for i, count in enumerate(totals) if count > limit and refuse}
        sent = [i for i in range(len(texts)) if i not in rejected]
        inputs = [texts[i] if totals[i] <= limit else self._tokenizer.truncate(texts[i], limit) for i in sent]
        return sent, inputs, [min(totals[i], limit) for i in sent], rejected

    async def _check_canaries_if_due(self) -> None:
        """Embed the canaries again when due; halt the model when one drifted from its recorded vector."""
        if self._canaries is None:
            return
        async with self._canary_lock:
            due = self._checked_at is None or time.monotonic() - self._checked_at >= self._settings.canary_every_s
            if not due or self.halted:
                return
            texts = list(CANARY_TEXTS)
            vectors, rejected = await self._client.embed(texts, self._tokenizer.count(texts), priority=0)
            cosines = (_unit(vectors) * self._canaries).sum(axis=1)
            lowest = math.nan if rejected else float(cosines.min())
            self._checked_at = time.monotonic()
        if not lowest >= CANARY_MIN_COSINE:  # NaN (a canary without a usable vector) fails too
            self._halt("canary_drift", (
                f"model {self._label!r}: the endpoint's vectors for the canary texts changed (lowest cosine "
                f"{lowest:.4f} < {CANARY_MIN_COSINE}): the model behind {self._settings.model!r} at {self._host} "
                "is not the one registered. Segue stopped writing it. Register it again under a new name (segue models "
                "add NEW-NAME --provider openai --model … --base-url …) and migrate to it (segue migrate start "
                "--to NEW-NAME)"))
            raise ModelHalted(self.halted)
        log.info("model %s: canaries checked (lowest cosine %.5f)", self._label, lowest)

    def _halt(self, reason: str, message: str) -> None:
        self.halted = message
        metrics.MODEL_HALTED.labels(self._label, reason).set(1)
        log.error("%s", message)


class _Tokenizer:
    """Counts and cuts texts as the endpoint's model does: tiktoken, or a Hugging Face tokenizer."""

    def __init__(self, spec: str):
        if spec.startswith("tiktoken:"):
            try:
                import tiktoken
            except ImportError as exc:
                raise ModuleNotFoundError("tokenizer=tiktoken:… needs the 'openai' extra: "
                                          "pip install 'segue[openai]'") from exc
            self._tiktoken = tiktoken.get_encoding(spec.removeprefix("tiktoken:"))
            self._hf = None
        else:
            from tokenizers import Tokenizer

            folder = resolve_source(spec)
            found = sorted(folder.glob("tokenizer.json")) or sorted(folder.glob("*/tokenizer.json"))
            if not found:
                raise OptionsError(f"tokenizer {spec!r}: no tokenizer.json in {folder}")
            self._hf = Tokenizer.from_file(str(found[0]))
            self._hf.no_truncation()
            self._hf.no_padding()
            self._tiktoken = None

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes, special tokens included, before truncation."""
        if self._hf is not None:
            return [len(encoding.ids) for encoding in self._hf.encode_batch(list(texts))]
        return [len(ids) for ids in self._tiktoken.encode_batch(list(texts), disallowed_special=())]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The (start, end) characters of each of ``text``'s content tokens."""
        if self._hf is not None:
            encoding = self._hf.encode(text)
            return [offsets for offsets, special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
        decoded, starts = self._tiktoken.decode_with_offsets(self._tiktoken.encode(text, disallowed_special=()))
        return list(zip(starts, [*starts[1:], len(decoded)]))

    def truncate(self, text: str, limit: int) -> str:
        """``text`` cut after the token that makes it ``limit`` tokens long (special tokens included)."""
        if self._hf is None:
            return self._tiktoken.decode(self._tiktoken.encode(text, disallowed_special=())[:limit])
        encoding = self._hf.encode(text)
        content = [offsets for offsets, special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
        keep = limit - (len(encoding.ids) - len(content))
        return text[: content[keep - 1][1]] if keep > 0 else ""


def _host(source: str) -> str:
    """The endpoint's host and port, without any credentials the URL carries."""
    parts = urlsplit(source)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def _settings(options: OpenAIOptions, source: str) -> OpenAIOptions:
    """``options`` checked against the base URL, with the defaults that depend on it and on the model's name."""
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionsError(f"--base-url {source!r} is not an http(s) URL such as https://api.openai.com/v1")
    if parts.username is not None or parts.password is not None:
        raise OptionsError("the base URL carries credentials (user:password@): remove them, and give the API key "
                           "in an environment variable named by --api-key-env (it is never stored)")
    defaults: dict[str, Any] = {}
    if options.api_key_env is None and parts.hostname == "api.openai.com":
        defaults["api_key_env"] = "OPENAI_API_KEY"
    list_price = LIST_PRICES.get(options.model)
    if options.price_per_million_tokens is None and list_price is not None:
        defaults["price_per_million_tokens"] = list_price
        defaults["batch_price_per_million_tokens"] = options.batch_price_per_million_tokens or list_price / 2
    return options.model_copy(update=defaults)


def _profile(source: str, settings: OpenAIOptions, canaries: np.ndarray) -> ModelProfile:
    """The profile of an API model: its identity hashes the canary vectors with what shapes them."""
    identity = {"kind": NAME, "host": urlsplit(source).netloc, **{key: getattr(settings, key) for key in IDENTITY}}
    config = {**settings.model_dump(), "canary_vectors": base64.b64encode(canaries.astype("<f4").tobytes()).decode()}
    return ModelProfile(provider=NAME, dim=int(canaries.shape[1]), max_tokens=settings.max_tokens_per_input,
                        config=config, fingerprint=fingerprint({"canaries": canaries.astype(np.float32)}, {},
                                                               identity))


def _decode_canaries(encoded: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded), dtype="<f4").astype(np.float32).reshape(-1, dim)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

