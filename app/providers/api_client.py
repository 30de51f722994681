"""Requests to an OpenAI-compatible ``/embeddings`` endpoint: packing by tokens, budgets, retries, classified errors.

One :class:`EmbeddingsClient` serves one registered API model, on one event loop. It

* packs texts into requests within the endpoint's limits (inputs and tokens per request);
* paces requests with requests- and tokens-per-minute budgets (pyrate-limiter) and at most
  ``concurrency`` requests in flight, granted by priority (read misses before changes
  before the backfill);
* retries what can clear — 429 and 503 after their ``Retry-After``, 5xx, timeouts, an
  unreachable server, a malformed body or a wrong dimension with jittered backoff — until
  ``outage_after_s`` has passed, then raises a :class:`~segue.errors.ProviderError`
  naming the class of the last failure;
* splits a request the endpoint rejects for one input (context length) until the input
  is alone, which then raises :class:`~segue.errors.InputRejected` (the event's fault);
* raises at once, without retrying, what no retry can fix: a refused key (``auth``) or a
  request the endpoint refuses whatever it holds (``rejected``: unknown model, bad options).

The API key is sent in a header and appears in no log line or error message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from segue import metrics
from segue.errors import InputRejected, ProviderError
from segue.ratelimit import per_second

log = logging.getLogger("segue.providers.api")

MAX_BACKOFF_S = 30.0
FIRST_BACKOFF_S = 0.5
TOO_LONG_MARKERS = ("context length", "context_length", "too long", "too many tokens", "maximum input length")


@dataclass(frozen=True)
class Limits:
    """What the endpoint allows and how long an outage is waited out."""

    max_inputs_per_request: int
    max_tokens_per_request: int
    requests_per_minute: float
    tokens_per_minute: float
    concurrency: int
    timeout_s: float  # one request
    outage_after_s: float  # retrying a request this long without success is an outage


def pack(tokens: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Indexes of the texts cut into requests of at most ``max_inputs`` texts and ``max_tokens`` tokens, in order."""
    requests: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, count in enumerate(tokens):
        if current and (len(current) == max_inputs or total + count > max_tokens):
            requests.append(current)
            current, total = [], 0
        current.append(index)
        total += count
    if current:
        requests.append(current)
    return requests


class PrioritySlots:
    """At most ``size`` holders at a time; waiters are let in by priority (lower first), then by arrival."""

    def __init__(self, size: int):
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        """Hold a slot for the ``async with`` body."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._seq), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted, then cancelled: pass the slot on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1


class EmbeddingsClient:
    """Embeds texts through one model of an OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(self, *, base_url: str, model: str, dimensions: int | None, api_key: str | None,
                 encoding_format: str, limits: Limits, label: str, dim: int | None):
        """``label`` names the model in logs and metrics; ``dimensions`` is sent when set; ``dim`` is the width
        every vector must have (None while registering, when it is being found out)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers,
                                       timeout=limits.timeout_s,
                                       limits=httpx.Limits(max_connections=limits.concurrency))
        self._model = model
        self._dimensions = dimensions
        self._dim = dim
        self._encoding_format = encoding_format
        self._limits = limits
        self._label = label
        self._slots = PrioritySlots(limits.concurrency)
        self._requests = per_second(limits.requests_per_minute / 60)
        self._tokens = per_second(limits.tokens_per_minute / 60, burst=limits.max_tokens_per_request)

    async def embed(self, texts: Sequence[str], tokens: Sequence[int], *, priority: int) -> np.ndarray:
        """Raw vectors ``(len(texts), dim)`` for texts already within the input limit; ``tokens`` counts each."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        requests = pack(tokens, self._limits.max_inputs_per_request, self._limits.max_tokens_per_request)
        return await _all(self._split_on_rejection([texts[i] for i in request], [tokens[i] for i in request], priority)
                          for request in requests)

    async def close(self) -> None:
        """Close the HTTP connections and the limiters."""
        await self._http.aclose()
        self._requests.close()
        self._tokens.close()

    async def _split_on_rejection(self, texts: list[str], tokens: list[int], priority: int) -> np.ndarray:
        try:
            return await self._retrying(texts, tokens, priority)
        except InputRejected:
            if len(texts) == 1:
                raise
            half = len(texts) // 2
            log.info("model %s: the endpoint rejected a request of %d inputs for one of them; splitting it",
                     self._label, len(texts))
            return await _all([self._split_on_rejection(texts[:half], tokens[:half], priority),
                               self._split_on_rejection(texts[half:], tokens[half:], priority)])

    async def _retrying(self, texts: list[str], tokens: list[int], priority: int) -> np.ndarray:
        """One request, retried with jittered backoff (or the endpoint's Retry-After) until the outage deadline."""
        deadline = time.monotonic() + self._limits.outage_after_s
        backoff = FIRST_BACKOFF_S
        for attempt in itertools.count(1):
            try:
                return await self._request(texts, tokens, priority)
            except ProviderError as error:
                if error.retry_after is not None:
                    wait = error.retry_after * random.uniform(1.0, 1.2)
                else:
                    wait = random.uniform(backoff / 2, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                if not error.retryable or time.monotonic() + wait > deadline:
                    raise
                log.warning("model %s: %s (attempt %d); retrying in %.1fs", self._label, error, attempt, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _request(self, texts: list[str], tokens: list[int], priority: int) -> np.ndarray:
        payload: dict = {"model": self._model, "input": texts, "encoding_format": self._encoding_format}
        if self._dimensions:
            payload["dimensions"] = self._dimensions
        async with self._slots.hold(priority):
            await self._requests.try_acquire_async(self._label)
            await self._tokens.try_acquire_async(self._label, max(sum(tokens), 1))
            started = time.perf_counter()
            try:
                response = await self._http.post("embeddings", json=payload)
            except httpx.TimeoutException:
                raise self._failed(ProviderError("timeout", f"no response within {self._limits.timeout_s:g}s"))
            except httpx.TransportError as error:
                raise self._failed(ProviderError("unreachable", f"{type(error).__name__}: {error}")) from None
            finally:
                metrics.PROVIDER_SECONDS.labels(self._label).observe(time.perf_counter() - started)
        try:
            vectors = self._parse(response, len(texts))
        except (ProviderError, InputRejected) as error:
            raise self._failed(error)
        metrics.PROVIDER_REQUESTS.labels(self._label, "ok").inc()
        return vectors

    def _failed(self, error: Exception) -> Exception:
        kind = error.kind if isinstance(error, ProviderError) else "too_long"
        metrics.PROVIDER_REQUESTS.labels(self._label, kind).inc()
        return error

    def _parse(self, response: httpx.Response, count: int) -> np.ndarray:
        """The vectors of a response, or the classified error it carries."""
        status = response.status_code
        if status != 200:
            raise _classify(response)
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = [_vector(item["embedding"]) for item in data]
        except (ValueError, KeyError, TypeError) as error:
            raise ProviderError("malformed", f"a 200 response whose body is not an embeddings list "
                                f"({type(error).__name__})") from None
        if len(vectors) != count:
            raise ProviderError("malformed", f"{len(vectors)} embeddings for {count} inputs")
        widths = {len(vector) for vector in vectors}
        if len(widths) != 1:
            raise ProviderError("malformed", f"embeddings of different widths {sorted(widths)}")
        if self._dim is not None and widths != {self._dim}:
            raise ProviderError("wrong_dimension", f"{widths.pop()}-d embeddings from a model registered as "
                                f"{self._dim}-d")
        return np.stack(vectors)


async def _all(requests) -> np.ndarray:
    """The requests' vectors in order; a failure is raised once every request has finished (none left running)."""
    results = await asyncio.gather(*requests, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return np.concatenate(results)


def _vector(embedding) -> np.ndarray:
    """An embedding as float32, from a list of numbers or a base64 string of little-endian float32."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4").astype(np.float32)
    if not isinstance(embedding, list) or not embedding:
        raise TypeError("an embedding is neither a list of numbers nor base64")
    return np.asarray(embedding, dtype=np.float32)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` (or ``retry-after-ms``) header asks for; None without one."""
    milliseconds = response.headers.get("retry-after-ms")
    seconds = response.headers.get("retry-after")
    try:
        if milliseconds is not None:
            return max(float(milliseconds) / 1000, 0.0)
        if seconds is not None:
            return max(float(seconds), 0.0)
    except ValueError:  # an HTTP date: wait the usual backoff instead
        return None
    return None


def _error_message(response: httpx.Response) -> str:
    """The endpoint's own error message (OpenAI's ``{"error": {"message"}}`` or plain text), shortened."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") or error.get("detail") or str(error) if isinstance(error, dict) else str(error)
    except ValueError:
        message = response.text
    return " ".join(str(message).split())[:300]


def _classify(response: httpx.Response) -> Exception:
    status = response.status_code
    message = f"HTTP {status}: {_error_message(response)}"
    if status in (401, 403):
        return ProviderError("auth", message, retryable=False)
    if status == 429:
        return ProviderError("rate_limited", message, retry_after=_retry_after(response))
    if status >= 500:
        return ProviderError("server_error", message, retry_after=_retry_after(response))
    if status in (400, 413, 422) and any(marker in message.lower() for marker in TOO_LONG_MARKERS):
        return InputRejected(f"too_long: {message}")
    return ProviderError("rejected", message, retryable=False)
