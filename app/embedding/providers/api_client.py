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
* reads a response whole within ``timeout_s`` (a body that drips in slowly is a timeout)
  and up to a size bound for the inputs asked (a larger body is malformed), and checks it:
  indexes exactly 0…n−1, each once; every vector a list of finite numbers (or base64) of
  the model's width. An item that fails is that input's rejection (the others are kept);
  when not one vector has the model's width, the probe text is sent alone: if its vector
  has another width too, the endpoint serves another model (``wrong_dimension``, retried),
  else the request is sent once more and what still fails is its inputs' rejection;
* answers a request the endpoint refuses (another 4xx) by finding out whose fault it is:
  when even one canary text is refused, the endpoint refuses everything (``rejected``,
  which the provider turns into a halted model); otherwise the request is split until
  each refused input is alone, which is that input's rejection, and when both halves go
  through the request was too big for the endpoint: later requests carry fewer inputs;
* raises at once, without retrying, a refused key (``auth``).

Every answered request is billed by the endpoint; :attr:`EmbeddingsClient.billed_tokens`
counts the tokens they carried, kept or not (retries, splits, canaries, discarded bodies).

The API key is sent in a header and appears in no log line or error message: error bodies
are shown with it (and anything shaped like a key) replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import itertools
import json
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx
import numpy as np

from segue import metrics
from segue.errors import InputRejected, ProviderError
from segue.ratelimit import per_second

log = logging.getLogger("segue.embedding.providers.api")

MAX_BACKOFF_S = 30.0
FIRST_BACKOFF_S = 0.5
TOO_LONG_MARKERS = ("context length", "context_length", "too long", "too many tokens", "maximum input length")
REFUSED_PROBE_FRESH_S = 60.0  # a request answered this recently shows the endpoint takes requests: no probe
RESPONSE_BASE_BYTES = 1 << 20  # a response may hold this much besides its vectors
RESPONSE_BYTES_PER_COMPONENT = 32  # and this much per vector component (a float as JSON text, with room)
UNKNOWN_WIDTH = 4096  # components assumed per vector while the width is being found out (registration)
KEY_SHAPED = re.compile(r"\b(sk|pk|rk|key|api)[-_][A-Za-z0-9_\-]{6,}", re.IGNORECASE)

Vectors = list[np.ndarray | None]  # one per input; None where the input was rejected
Rejections = dict[int, str]  # input index: why the model gives it no vector ("kind: message")


@dataclass(frozen=True)
class Limits:
    """What the endpoint allows and how long an outage is waited out."""

    max_inputs_per_request: int
    max_tokens_per_request: int
    requests_per_minute: float
    tokens_per_minute: float
    concurrency: int
    timeout_s: float  # one request, to the last byte of its response
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
                 encoding_format: str, limits: Limits, label: str, dim: int | None, probe: tuple[str, int]):
        """``label`` names the model in logs and metrics; ``dimensions`` is sent when set; ``dim`` is the width
        every vector must have (None while registering, when it is being found out); ``probe`` is a text the
        endpoint must take (and its tokens), sent alone to tell a refused input from a refused model."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers,
                                       timeout=limits.timeout_s,
                                       limits=httpx.Limits(max_connections=limits.concurrency))
        self._secret = api_key
        self._model = model
        self._dimensions = dimensions
        self._dim = dim
        self._encoding_format = encoding_format
        self._limits = limits
        self._max_inputs = limits.max_inputs_per_request  # lowered when the endpoint refuses a request's size
        self._label = label
        self._probe = probe
        self._answered_at = -math.inf  # monotonic time of the last request the endpoint answered
        self._slots = PrioritySlots(limits.concurrency)
        self._requests = per_second(limits.requests_per_minute / 60)
        self._tokens = per_second(limits.tokens_per_minute / 60, burst=limits.max_tokens_per_request)
        self.billed_tokens = 0  # tokens of every request the endpoint answered (what it bills)

    async def embed(self, texts: Sequence[str], tokens: Sequence[int], *,
                    priority: int) -> tuple[np.ndarray, Rejections]:
        """Raw vectors ``(len(texts), dim)`` for texts already within the input limit (``tokens`` counts each), and
        the inputs the model gave no usable vector (their rows are zeros)."""
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32), {}
        requests = pack(tokens, self._max_inputs, self._limits.max_tokens_per_request)
        parts = await _all(self._embed_part([texts[i] for i in request], [tokens[i] for i in request], priority)
                           for request in requests)
        vectors: Vectors = []
        rejected: Rejections = {}
        for part_vectors, part_rejected in parts:
            rejected.update({len(vectors) + i: why for i, why in part_rejected.items()})
            vectors += part_vectors
        width = self._dim or next((len(v) for v in vectors if v is not None), 0)
        stacked = np.zeros((len(vectors), width), dtype=np.float32)
        for i, vector in enumerate(vectors):
            if vector is not None:
                stacked[i] = vector
        return stacked, rejected

    async def close(self) -> None:
        """Close the HTTP connections and the limiters."""
        await self._http.aclose()
        self._requests.close()
        self._tokens.close()

    async def _embed_part(self, texts: list[str], tokens: list[int], priority: int) -> tuple[Vectors, Rejections]:
        """One request's vectors; a refused request is split until the refused inputs are alone."""
        try:
            return await self._retrying(texts, tokens, priority)
        except InputRejected as error:  # the endpoint says one input is too long
            refusal, refused_whole = str(error), None
        except ProviderError as error:
            if error.kind != "refused":
                raise
            await self._require_requests_taken(priority)
            refusal, refused_whole = f"refused: {error.detail}", error
        if len(texts) == 1:
            return [None], {0: refusal}
        half = len(texts) // 2
        if refused_whole is None:
            log.info("model %s: the endpoint rejected a request of %d inputs for one of them; splitting it",
                     self._label, len(texts))
        (first, first_rejected), (second, second_rejected) = await _all([
            self._embed_part(texts[:half], tokens[:half], priority),
            self._embed_part(texts[half:], tokens[half:], priority)])
        if refused_whole is not None and not first_rejected and not second_rejected:
            self._shrink(len(texts), len(texts) - half, refused_whole)
        return first + second, first_rejected | {half + i: why for i, why in second_rejected.items()}

    def _shrink(self, refused: int, taken: int, error: ProviderError) -> None:
        """The endpoint refused ``refused`` inputs in one request and took ``taken``: send at most that many."""
        if taken < self._max_inputs:
            self._max_inputs = taken
            log.warning("model %s: the endpoint refused a request of %d inputs (%s) and took its halves: requests "
                        "now carry at most %d inputs (register the model with --option max_inputs_per_request=%d "
                        "to start there)", self._label, refused, error.detail, taken, taken)

    async def _require_width(self, widths: set[int], priority: int) -> None:
        """Raise ``wrong_dimension`` when the probe text's vector has another width too: the endpoint serves another
        model (an answer whose every vector has another width could be its texts' fault, or the endpoint's)."""
        text, count = self._probe
        _, rejected = await self._request([text], [count], priority, recheck=False)
        if rejected.get(0, "").startswith("wrong_width:"):
            raise ProviderError("wrong_dimension", f"{'/'.join(map(str, sorted(widths)))}-d embeddings from a model "
                                f"registered as {self._dim}-d (the one-text request {text!r} too)")

    async def _require_requests_taken(self, priority: int) -> None:
        """Raise ``rejected`` unless the endpoint takes requests at all: answered one lately, or takes the probe."""
        if time.monotonic() - self._answered_at < REFUSED_PROBE_FRESH_S:
            return
        text, count = self._probe
        try:
            await self._request([text], [count], priority, recheck=False)
        except (ProviderError, InputRejected) as error:
            if isinstance(error, ProviderError) and error.kind not in ("refused", "wrong_dimension"):
                raise  # the endpoint fails now (5xx, timeout…): an outage, retried by the caller's caller
            shown = error.detail if isinstance(error, ProviderError) else str(error)
            raise ProviderError("rejected", f"refuses every request, even the one-text request {text!r} ({shown})",
                                retryable=False) from None

    async def _retrying(self, texts: list[str], tokens: list[int], priority: int) -> tuple[Vectors, Rejections]:
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

    async def _request(self, texts: list[str], tokens: list[int], priority: int, *,
                       recheck: bool = True) -> tuple[Vectors, Rejections]:
        """One request's vectors and rejections; with ``recheck``, an answer without one vector of the model's width
        is checked with the probe (:meth:`_require_width`) and, the probe passing, asked once more."""
        payload: dict = {"model": self._model, "input": texts, "encoding_format": self._encoding_format}
        if self._dimensions:
            payload["dimensions"] = self._dimensions
        limit = RESPONSE_BASE_BYTES + len(texts) * (self._dim or UNKNOWN_WIDTH) * RESPONSE_BYTES_PER_COMPONENT
        async with self._slots.hold(priority):
            await self._requests.try_acquire_async(self._label)
            await self._tokens.try_acquire_async(self._label, max(sum(tokens), 1))
            started = time.perf_counter()
            try:
                status, headers, body = await asyncio.wait_for(self._post(payload, sum(tokens), limit),
                                                               self._limits.timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise self._failed(ProviderError(
                    "timeout", f"no whole response within {self._limits.timeout_s:g}s")) from None
            except httpx.TransportError as error:
                raise self._failed(ProviderError("unreachable", f"{type(error).__name__}: {error}")) from None
            except ProviderError as error:
                raise self._failed(error) from None
            finally:
                metrics.PROVIDER_SECONDS.labels(self._label).observe(time.perf_counter() - started)
        try:
            if status != 200:
                raise _classify(status, headers, body, self._secret)
            vectors, rejected, widths = parse_embeddings(_json(body), len(texts), self._dim)
            if recheck and self._dim is not None and widths and self._dim not in widths:
                await self._require_width(set(widths), priority)
        except (ProviderError, InputRejected) as error:
            raise self._failed(error) from None
        if recheck and self._dim is not None and widths and self._dim not in widths:
            log.warning("model %s: wrong_dimension: %s-d embeddings from a model registered as %d-d, but the one-text "
                        "probe's is %d-d: sending the request again", self._label,
                        "/".join(map(str, sorted(widths))), self._dim, self._dim)
            return await self._request(texts, tokens, priority, recheck=False)
        metrics.PROVIDER_REQUESTS.labels(self._label, "ok").inc()
        return vectors, rejected

    async def _post(self, payload: dict, tokens: int, limit: int) -> tuple[int, httpx.Headers, bytes]:
        """POST ``payload`` (of ``tokens`` tokens); the status, headers and body, read to its end unless it grows over
        ``limit`` bytes. A 200 is billed from its status line on, whatever its body turns out to be."""
        async with self._http.stream("POST", "embeddings", json=payload) as response:
            if response.status_code == 200:
                self._answered_at = time.monotonic()
                self.billed_tokens += tokens
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ProviderError("malformed", f"a response of over {limit:,} bytes for {len(payload['input'])}"
                                        " inputs (not read further)")
            return response.status_code, response.headers, bytes(body)

    def _failed(self, error: Exception) -> Exception:
        kind = error.kind if isinstance(error, ProviderError) else "too_long"
        metrics.PROVIDER_REQUESTS.labels(self._label, kind).inc()
        return error


class ParsedAnswer(NamedTuple):
    """An answer's vectors in input order (None where rejected), the rejected inputs, and the widths it held."""

    vectors: Vectors
    rejected: Rejections
    widths: Counter[int]  # vectors by width, malformed ones aside


def parse_embeddings(body: Any, count: int, dim: int | None) -> ParsedAnswer:
    """The vectors of a 200 response's decoded JSON ``body`` for ``count`` inputs, in input order, and the inputs
    whose item holds no usable vector (malformed, non-finite, or not ``dim`` wide; without ``dim``, not as wide
    as most).

    Raises :class:`ProviderError` ``malformed`` when the body is not an embeddings list whose indexes are exactly
    0…count−1, each once.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ProviderError("malformed", "a 200 response whose body is not an embeddings list")
    indexes = [item.get("index") for item in data]
    if not all(type(index) is int for index in indexes) or sorted(indexes) != list(range(count)):
        shown = ", ".join(map(repr, indexes[:8])) + (", …" if len(indexes) > 8 else "")
        raise ProviderError("malformed", f"a 200 response whose indexes ({shown}) are not 0…{count - 1}, each once")
    vectors: Vectors = [None] * count
    rejected: Rejections = {}
    for item in data:
        try:
            vectors[item["index"]] = _vector(item.get("embedding"))
        except ValueError as error:
            rejected[item["index"]] = f"malformed: {error}"
    widths = Counter(len(v) for v in vectors if v is not None)
    wanted = dim if dim is not None else (widths.most_common(1)[0][0] if widths else None)
    for i, vector in enumerate(vectors):
        if vector is None:
            continue
        if len(vector) != wanted:
            rejected[i], vectors[i] = f"wrong_width: a {len(vector)}-d vector among {wanted}-d ones", None
        elif not np.isfinite(vector).all():
            rejected[i], vectors[i] = "non_finite: the vector holds NaN or infinite values", None
    return ParsedAnswer(vectors, rejected, widths)


def _vector(embedding: Any) -> np.ndarray:
    """An embedding as float32, from a list of numbers or a base64 string of little-endian float32."""
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except ValueError:
            raise ValueError("the embedding is a string but not base64") from None
        if not raw or len(raw) % 4:
            raise ValueError(f"base64 of {len(raw)} bytes, not a whole number of float32")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not isinstance(embedding, list) or not embedding:
        raise ValueError(f"the embedding is {type(embedding).__name__}, not a list of numbers or base64")
    if not all(type(x) in (int, float) for x in embedding):
        bad = next(x for x in embedding if type(x) not in (int, float))
        raise ValueError(f"the embedding holds {bad!r}, not a number")
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, rejected by the finiteness check
            return np.asarray(embedding, dtype=np.float64).astype(np.float32)
    except OverflowError:
        raise ValueError("the embedding holds an integer beyond any float") from None


async def _all(requests) -> list:
    """The requests' results in order; a failure is raised once every request has finished (none left running)."""
    results = await asyncio.gather(*requests, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _json(body: bytes) -> Any:
    """A response body as JSON (NaN and Infinity literals included, which the vector checks then reject)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ProviderError("malformed", "a 200 response whose body is not JSON") from None


def _retry_after(headers: httpx.Headers) -> float | None:
    """The seconds a ``Retry-After`` (or ``retry-after-ms``) header asks for; None without a usable one."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:  # an HTTP date: wait the usual backoff instead
            return None
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    return None


def _error_message(body: bytes, secret: str | None) -> str:
    """The endpoint's own error message (OpenAI's ``{"error": {"message"}}``, plain text or an HTML page),
    shortened, with the API key and anything shaped like one replaced by ``***``."""
    try:
        decoded = json.loads(body)
        error = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
        message = error.get("message") or error.get("detail") or str(error) if isinstance(error, dict) else str(error)
    except (ValueError, RecursionError):
        message = re.sub(r"<[^>]*>", " ", body[:20_000].decode(errors="replace"))
    message = " ".join(str(message).split())
    if secret:
        message = message.replace(secret, "***")
    return KEY_SHAPED.sub(r"\1-***", message)[:300]


def _classify(status: int, headers: httpx.Headers, body: bytes, secret: str | None) -> Exception:
    message = f"HTTP {status}: {_error_message(body, secret)}"
    if status in (401, 403):
        return ProviderError("auth", message, retryable=False)
    if status == 429:
        return ProviderError("rate_limited", message, retry_after=_retry_after(headers))
    if status >= 500:
        return ProviderError("server_error", message, retry_after=_retry_after(headers))
    if status in (400, 413, 422) and any(marker in message.lower() for marker in TOO_LONG_MARKERS):
        return InputRejected(f"too_long: {message}")
    return ProviderError("refused", message, retryable=False)
