"""The embedding engine: a scheduler that turns texts into L2-normalised float32 vectors for registered models.

It knows nothing about any kind of model: a provider (``segue.embedding.providers``) loads each
one as an :class:`~segue.embedding.providers.Embedder`, and the engine checks its fingerprint and
dimension, normalises what it returns, and decides when it runs.

All model work — loading and forward passes — happens in one worker thread owned by
the engine, so the asyncio event loop (and with it Kafka heartbeats) never stalls on
a model. :meth:`EmbeddingEngine.embed` splits a request into chunks and queues them by
priority (lower number first: 0 read misses, 1 live changes, 2 backfill; FIFO within a
priority), so a later urgent request overtakes the rest of a large backfill after at most
one chunk. Each chunk is tokenized once (token counts and model inputs together), on a
second thread and one chunk ahead: while a forward pass runs, the next queued chunk is
tokenized, so a GPU is not left waiting on the CPU. :meth:`EmbeddingEngine.embed_sync`
runs the same code in the caller's thread for the CLI, benchmarks and tests; a lock keeps
it from running a model at the same time as the worker.

Texts are sorted by length before chunking, so each chunk is one forward pass padded
only to its own longest text, and the original order is restored afterwards. A chunk is
budgeted by time, not by a fixed count: the engine learns each model's seconds per padded
character from its own forward passes and cuts chunks expected to take ``chunk_seconds``
(at most ``batch_size`` texts). That bounds how long a read miss waits behind queued work
on any device: a few abstracts a chunk on two CPU cores, hundreds on a GPU. For
``URGENT_RECENT_S`` after a read miss, other work is cut into chunks of a quarter of that
time, so the misses that follow wait less; without misses, chunks stay long, which is faster.

A model behind an API (an embedder with ``remote = True``) does no work on that thread:
its requests go to the embedder's own event loop, with their own budgets and priorities,
and are awaited, so an API's latency never holds up a local model.

Every vector is checked before it is normalised: one with NaN or infinite values, or all
zeros (a static model given a text it has no token for), is no vector at all. Such a text
is *rejected* for that model (:attr:`Embedded.rejected`, with the endpoint's own
rejections of an API model), counted, and left to the caller: the other texts and the
other models go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segue import metrics
from segue.embedding import providers
from segue.embedding.providers import Embedder
from segue.embedding.providers.base import Prepared
from segue.errors import EngineStopped, InputRejected, ModelHalted, ModelUnavailable
from segue.settings import Settings
from segue.spec import ModelSpec

log = logging.getLogger("segue.embedding.engine")

_WARM_UP_TEXT = "Segue warms the model up with this sentence."
_CHARS_PER_TOKEN = 5  # a text longer than its model's input limit costs at most this many characters a token
_RATE_SMOOTHING = 0.2  # weight of the newest forward pass in a model's seconds per padded character
URGENT = 0  # the priority of requests someone waits for (read misses)
URGENT_RECENT_S = 10.0  # for this long after an urgent request, other work is cut in shorter chunks
URGENT_CHUNK_SHARE = 0.25  # of chunk_seconds: how long an urgent request waits behind a running chunk then


class DimensionMismatch(ModelUnavailable):
    """A model produced vectors whose width differs from its registered dimension."""

    def __init__(self, spec: ModelSpec, produced: int):
        super().__init__(
            f"model {spec.name!r} (v{spec.version}) produced {produced}-d vectors but is registered as {spec.dim}-d"
        )
        self.spec = spec
        self.produced = produced


class FingerprintMismatch(ModelUnavailable):
    """The model at a registered source is no longer the model that was registered."""


@dataclass(frozen=True)
class Embedded:
    """Vectors of texts, the tokens each text has before truncation to the model's input limit, and the texts the
    model gave no usable vector."""

    vectors: np.ndarray  # float32 (texts, dim), unit rows; zeros where rejected
    tokens: list[int]
    rejected: dict[int, str] = field(default_factory=dict)  # text index: why ("kind: message")

    def tokens_used(self, spec: ModelSpec) -> list[int]:
        """The tokens each text was embedded with (after truncation): what an API bills."""
        return [min(count, spec.max_tokens) for count in self.tokens] if spec.max_tokens else list(self.tokens)


class _Chunk:
    """The texts of one forward pass, and their tokenization once it has been started."""

    def __init__(self, spec: ModelSpec, texts: list[str]):
        self.spec = spec
        self.texts = texts
        self._prepared: concurrent.futures.Future[Prepared] | None = None

    def prepare_ahead(self, embedder: Embedder, tokenizer: _TokenizerThread) -> None:
        """Start tokenizing on ``tokenizer``'s thread unless already started."""
        if self._prepared is None:
            self._prepared = tokenizer.submit(embedder.prepare, self.texts)

    def prepared(self, embedder: Embedder) -> Prepared:
        """The tokenized texts: those started ahead, or tokenized now in this thread."""
        return self._prepared.result() if self._prepared is not None else embedder.prepare(self.texts)


class _TokenizerThread:
    """One daemon thread that runs preparations in order, so a stuck tokenizer can never hold up an exit."""

    def __init__(self):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="segue-tokenize", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[..., Prepared], *args: Any) -> concurrent.futures.Future[Prepared]:
        future: concurrent.futures.Future[Prepared] = concurrent.futures.Future()
        self._work.put((future, run, args))
        return future

    def close(self) -> None:
        """Stop after the preparation in hand (waiting up to 5 s for it, so an exiting interpreter does not tear
        the thread down inside the tokenizer, and a stuck one still cannot hold up the exit); those still queued
        are cancelled."""
        self._work.put(None)
        self._thread.join(timeout=5.0)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, run, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(run(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the chunk
                future.set_exception(exc)
        while not self._work.empty():
            item = self._work.get()
            if item is not None:
                item[0].cancel()


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    run: Callable[[], Any] | None = field(compare=False)  # None tells the worker to stop
    future: asyncio.Future | None = field(compare=False)
    chunk: _Chunk | None = field(default=None, compare=False)  # a forward pass, which can be tokenized ahead
    queued_at: float = field(default_factory=time.perf_counter, compare=False)


class _Jobs:
    """Queued jobs, lowest priority number first and FIFO within one, with a look at the next."""

    def __init__(self):
        self._heap: list[_Job] = []
        self._ready = threading.Condition()

    def put(self, job: _Job) -> None:
        with self._ready:
            heapq.heappush(self._heap, job)
            self._ready.notify()

    def get(self) -> _Job:
        """The next job, waiting for one."""
        with self._ready:
            while not self._heap:
                self._ready.wait()
            return heapq.heappop(self._heap)

    def peek(self) -> _Job | None:
        """The job :meth:`get` would return now, left queued."""
        with self._ready:
            return self._heap[0] if self._heap else None

    def drain(self) -> list[_Job]:
        """Remove and return every queued job."""
        with self._ready:
            jobs, self._heap = sorted(self._heap), []
            return jobs


class EmbeddingEngine:
    """Loads models and embeds texts with them on one device, in one worker thread."""

    def __init__(self, *, device: str | None = None, batch_size: int = 256, chunk_seconds: float = 0.2):
        """``device`` is handed to providers (None: each picks, e.g. ``cuda`` when present, else ``cpu``).

        A forward pass takes at most ``batch_size`` texts and, once the model's speed is known,
        about ``chunk_seconds`` (one text at least).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if chunk_seconds <= 0:
            raise ValueError("chunk_seconds must be positive")
        self._device = device
        self._batch_size = batch_size
        self._chunk_seconds = chunk_seconds
        self._seconds_per_char: dict[int, float] = {}  # by model version, learnt from forward passes
        self._urgent_until = 0.0  # monotonic time until which chunks of other work are cut short
        self._models: dict[int, Embedder] = {}  # written only under _model_lock
        self._names: dict[int, str] = {}
        self._versions: frozenset[int] = frozenset()
        self._model_lock = threading.Lock()  # one forward pass at a time
        self._load_lock = threading.Lock()  # one load at a time, beside the forward passes of the models loaded
        self._jobs = _Jobs()
        self._tokenizing = _TokenizerThread()
        self._seq = itertools.count()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="segue-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingEngine:
        """An engine on ``SEGUE_DEVICE`` with ``SEGUE_EMBED_BATCH_SIZE`` and ``SEGUE_EMBED_CHUNK_MS``."""
        return cls(device=settings.device, batch_size=settings.embed_batch_size,
                   chunk_seconds=settings.embed_chunk_ms / 1000)

    def device_of(self, spec: ModelSpec) -> str:
        """Where ``spec`` runs, loading it first if needed (in the caller's thread, like :meth:`embed_sync`)."""
        return self._loaded(spec).device

    def billed_tokens(self) -> dict[int, int]:
        """Tokens each loaded API model's endpoint has billed so far (every answered request), by model version."""
        models = dict(self._models)
        return {version: embedder.billed_tokens for version, embedder in models.items()
                if getattr(embedder, "remote", False)}

    def count_tokens(self, spec: ModelSpec, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes as ``spec``'s input, before truncation (in the caller's thread)."""
        return self._loaded(spec).prepare(texts).tokens

    def token_spans_sync(self, spec: ModelSpec, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Like :meth:`token_spans`, but in the caller's thread (like :meth:`count_tokens`)."""
        return self._loaded(spec).token_spans(list(texts))

    async def token_spans(self, spec: ModelSpec, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Where each text's tokens are under ``spec``'s tokenizer (a chunked model's splitter needs them), found on
        the tokenizer thread."""
        await self.ensure_loaded([spec])
        return await asyncio.wrap_future(self._tokenizing.submit(self._models[spec.version].token_spans, list(texts)))

    def loaded(self) -> set[int]:
        """Versions of the models loaded so far."""
        return set(self._versions)

    def devices(self) -> dict[str, str]:
        """Where each loaded model runs, by name (a snapshot, without waiting for a forward pass)."""
        models, names = dict(self._models), dict(self._names)
        return {names[version]: embedder.device for version, embedder in models.items() if version in names}

    @property
    def alive(self) -> bool:
        """Whether the engine thread is serving requests (False once closed or if it died)."""
        return self._worker.is_alive() and not self._closed

    async def unload(self, retired: Iterable[int]) -> set[int]:
        """Free the loaded models among the ``retired`` versions (a retired model never runs again: a finished
        migration's old model, an aborted one's new model); returns the versions unloaded."""
        gone = set(self._versions) & set(retired)
        if gone:
            await self._gather([self._submit(0, functools.partial(self._drop, gone))])
            log.info("unloaded retired model version(s) %s", ", ".join(map(str, sorted(gone))))
        return gone

    async def ensure_loaded(self, specs: Iterable[ModelSpec]) -> dict[int, float]:
        """Load and warm up every spec not loaded yet; return ``{version: seconds}`` for those loaded now.

        Loads run one at a time in a thread of their own, beside the engine thread's forward passes
        of the models already loaded (a worker keeps embedding with the old model while a
        migration's new one loads). Raises :class:`ModelUnavailable` when a model cannot be
        loaded: :class:`FingerprintMismatch` when a source no longer holds the registered model,
        :class:`DimensionMismatch` when it produces vectors of another width.
        """
        if self._closed:
            raise EngineStopped("the embedding engine is closed")
        pending = {spec.version: spec for spec in specs if spec.version not in self._versions}
        seconds = [await asyncio.to_thread(self._load, spec) for spec in pending.values()]
        return {version: took for version, took in zip(pending, seconds) if took is not None}

    async def embed(self, spec: ModelSpec, texts: Sequence[str], *, priority: int) -> np.ndarray:
        """Embed ``texts`` with ``spec`` in the worker thread: float32 ``(len(texts), spec.dim)``, unit rows.

        Lower ``priority`` numbers are served first. The model is loaded on first use if
        :meth:`ensure_loaded` has not loaded it. Raises :class:`~segue.errors.InputRejected` when the
        model gives a text no usable vector.
        """
        return _usable(spec, await self.embed_counted(spec, texts, priority=priority))

    async def embed_counted(self, spec: ModelSpec, texts: Sequence[str], *, priority: int) -> Embedded:
        """Like :meth:`embed`, with each text's token count (for the truncation ledger and API spend), and the texts
        rejected (no usable vector) instead of an error."""
        if not texts:
            return Embedded(np.zeros((0, spec.dim), dtype=np.float32), [])
        await self.ensure_loaded([spec])
        embedder = self._models[spec.version]
        if getattr(embedder, "remote", False):
            self._refuse_halted(embedder)
            raw, tokens, rejected = await asyncio.wrap_future(embedder.submit(list(texts), priority))
            return self._remote(spec, raw, tokens, rejected)
        now = time.monotonic()
        if priority == URGENT:
            self._urgent_until = now + URGENT_RECENT_S
        urgent_nearby = priority != URGENT and now < self._urgent_until
        order, chunks = self._plan(spec, texts, self._chunk_seconds * (URGENT_CHUNK_SHARE if urgent_nearby else 1))
        futures = [self._submit(priority, functools.partial(self._encode, chunk), chunk) for chunk in chunks]
        return self._assemble(spec, order, await self._gather(futures))

    def embed_sync(self, spec: ModelSpec, texts: Sequence[str]) -> np.ndarray:
        """Like :meth:`embed`, but blocking and in the caller's thread."""
        return _usable(spec, self.embed_counted_sync(spec, texts))

    def embed_counted_sync(self, spec: ModelSpec, texts: Sequence[str]) -> Embedded:
        """Like :meth:`embed_counted`, but blocking and in the caller's thread."""
        if self._closed:
            raise EngineStopped("the embedding engine is closed")
        embedder = self._loaded(spec)
        if getattr(embedder, "remote", False):
            self._refuse_halted(embedder)
            return self._remote(spec, *embedder.submit(list(texts), 0).result())
        order, chunks = self._plan(spec, texts, self._chunk_seconds)
        parts = []
        for chunk, after in zip(chunks, chunks[1:] + [None]):
            if after is not None:
                after.prepare_ahead(embedder, self._tokenizing)
            parts.append(self._encode(chunk))
        return self._assemble(spec, order, parts)

    def halted(self) -> dict[str, str]:
        """Why each loaded model Segue stopped writing was stopped, by name (an API key refused, canary drift)."""
        models, names = dict(self._models), dict(self._names)
        return {names[version]: embedder.halted for version, embedder in models.items()
                if getattr(embedder, "halted", None) and version in names}

    def close(self) -> None:
        """Stop the worker after its current chunk, fail queued requests and free the models."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(_Job(-1, -1, None, None))
        self._worker.join()
        self._tokenizing.close()
        for job in self._jobs.drain():
            with self._submit_lock:
                self._queued(job.priority, -1)
            if job.future is not None:
                _settle(job.future, None, EngineStopped("the embedding engine was closed"))
        with self._model_lock:
            for embedder in self._models.values():
                embedder.close()
            for name in self._names.values():
                metrics.MODEL_READY.labels(name).set(0)
            self._models.clear()
            self._names.clear()
            self._versions = frozenset()

    # -- scheduling (event loop side) ----------------------------------------------------------

    def _submit(self, priority: int, run: Callable[[], Any], chunk: _Chunk | None = None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        with self._submit_lock:
            if self._closed:
                raise EngineStopped("the embedding engine is closed")
            if not self._worker.is_alive():
                raise EngineStopped("the embedding engine's thread is gone")
            self._jobs.put(_Job(priority, next(self._seq), run, future, chunk))
            self._queued(priority, +1)
        return future

    def _queued(self, priority: int, change: int) -> None:
        """Keep the queue-depth gauge of ``priority`` (callers hold ``_submit_lock``)."""
        if priority in metrics.PRIORITY_NAMES:
            metrics.ENGINE_QUEUE.labels(metrics.PRIORITY_NAMES[priority]).inc(change)

    @staticmethod
    async def _gather(futures: list[asyncio.Future]) -> list[Any]:
        try:
            return await asyncio.gather(*futures)
        except BaseException:
            for future in futures:  # the worker skips chunks whose caller is gone
                future.cancel()
            raise

    def _plan(self, spec: ModelSpec, texts: Sequence[str], seconds: float) -> tuple[list[int], list[_Chunk]]:
        """Order the texts by length and cut them into chunks expected to take ``seconds`` each."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rate = self._seconds_per_char.get(spec.version)
        budget = seconds / rate if rate else 0.0  # padded characters a chunk may hold
        chunks: list[list[str]] = [[]]
        for i in order:
            chunk = chunks[-1]
            if chunk and (len(chunk) == self._batch_size
                          or (len(chunk) + 1) * _cost(spec, texts[i]) > budget):
                chunk = []
                chunks.append(chunk)
            chunk.append(texts[i])
        return order, [_Chunk(spec, chunk) for chunk in chunks if chunk]

    @staticmethod
    def _assemble(spec: ModelSpec, order: list[int], parts: list[tuple[np.ndarray, list[int], dict[int, str]]],
                  ) -> Embedded:
        """Stack the chunks' vectors, token counts and rejections and put them back in the texts' original order."""
        vectors = np.empty((len(order), spec.dim), dtype=np.float32)
        tokens = np.zeros(len(order), dtype=np.int64)
        rejected: dict[int, str] = {}
        if parts:
            vectors[order] = np.concatenate([chunk for chunk, _, _ in parts])
            tokens[order] = np.concatenate([counts for _, counts, _ in parts])
            start = 0
            for chunk, _, chunk_rejected in parts:
                rejected.update({order[start + i]: why for i, why in chunk_rejected.items()})
                start += len(chunk)
        return Embedded(vectors, tokens.tolist(), rejected)

    @staticmethod
    def _refuse_halted(embedder: Embedder) -> None:
        if embedder.halted:
            raise ModelHalted(embedder.halted)

    def _remote(self, spec: ModelSpec, raw: np.ndarray, tokens: list[int], refused: dict[int, str]) -> Embedded:
        """An API's answer, checked and normalised like a local model's, counted in the same metrics."""
        vectors, rejected = self._normalised(spec, raw, refused)
        embedded = Embedded(vectors, list(tokens), rejected)
        self._count(spec, embedded.tokens, rejected)
        return embedded

    # -- model work (worker thread, or the caller's thread for embed_sync) ----------------------

    def _serve(self) -> None:
        """Run queued jobs until told to stop. Every job's future is settled, whatever it raised."""
        while True:
            job = self._jobs.get()
            if job.run is None:
                return
            with self._submit_lock:
                self._queued(job.priority, -1)
            if job.future.cancelled():
                continue
            if job.chunk is not None and job.priority in metrics.PRIORITY_NAMES:
                metrics.ENGINE_WAIT_SECONDS.labels(metrics.PRIORITY_NAMES[job.priority]).observe(
                    time.perf_counter() - job.queued_at)
            self._prepare_next()
            try:
                result = job.run()
            except Exception as exc:  # handed to the awaiting caller
                _settle(job.future, None, exc)
            except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit: the caller gets an error, the thread serves on
                _settle(job.future, None, RuntimeError(f"an engine job raised {type(exc).__name__}: {exc}"))
            else:
                _settle(job.future, result, None)

    def _prepare_next(self) -> None:
        """Start tokenizing the next queued chunk, so it is ready when this job's forward pass ends."""
        upcoming = self._jobs.peek()
        if upcoming is not None and upcoming.chunk is not None:
            embedder = self._models.get(upcoming.chunk.spec.version)
            if embedder is not None:
                upcoming.chunk.prepare_ahead(embedder, self._tokenizing)

    def _load(self, spec: ModelSpec) -> float | None:
        """Load ``spec`` unless it already is; return the seconds it took.

        The load and its warm-up passes run outside the forward-pass lock: models already loaded keep
        embedding meanwhile (a reader's searches on the old model while it warms the new one)."""
        with self._load_lock:
            if spec.version in self._models:
                return None
            return self._load_new(spec)

    def _drop(self, versions: set[int]) -> None:
        with self._model_lock:
            for version in versions:
                if version in self._models:
                    embedder = self._models.pop(version)
                    embedder.close()
                    metrics.MODEL_READY.labels(self._names.pop(version)).set(0)
                    self._seconds_per_char.pop(version, None)
            self._versions = frozenset(self._models)

    def _encode(self, chunk: _Chunk) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Vectors, token counts and rejections for one chunk (one forward pass), loading the model first if needed."""
        while True:
            embedder = self._loaded(chunk.spec)
            with self._model_lock:
                if self._models.get(chunk.spec.version) is not embedder:
                    continue  # unloaded meanwhile: load it again
                prepared = chunk.prepared(embedder)
                vectors, rejected = self._vectors(chunk.spec, embedder, chunk.texts, prepared)
                break
        self._count(chunk.spec, prepared.tokens, rejected)
        return vectors, prepared.tokens, rejected

    @staticmethod
    def _count(spec: ModelSpec, tokens: list[int], rejected: dict[int, str]) -> None:
        limit = spec.max_tokens or max(tokens, default=0)
        metrics.TEXTS_EMBEDDED.labels(spec.name).inc(len(tokens))
        metrics.TOKENS_EMBEDDED.labels(spec.name).inc(sum(min(count, limit) for count in tokens))
        metrics.TRUNCATED_TEXTS.labels(spec.name).inc(sum(count > limit for count in tokens))
        for why in rejected.values():
            metrics.TEXTS_REJECTED.labels(spec.name, why.partition(":")[0]).inc()

    def _loaded(self, spec: ModelSpec) -> Embedder:
        """The loaded model of ``spec``, loading it first if needed."""
        embedder = self._models.get(spec.version)
        if embedder is None:
            self._load(spec)
            embedder = self._models[spec.version]
        return embedder

    def _load_new(self, spec: ModelSpec) -> float:
        """Load, check and warm ``spec`` (the caller holds ``_load_lock``); its errors as :class:`ModelUnavailable`."""
        try:
            return self._load_checked(spec)
        except ModelUnavailable:
            raise
        except Exception as exc:
            raise ModelUnavailable(
                f"model {spec.name!r} (v{spec.version}) cannot be loaded from {spec.source}: {type(exc).__name__}: {exc}"
            ) from exc

    def _load_checked(self, spec: ModelSpec) -> float:
        started = time.perf_counter()
        embedder = providers.load(spec, self._device)
        if embedder.profile.fingerprint != spec.embedder_fingerprint:
            embedder.close()
            raise FingerprintMismatch(
                f"the model at {spec.source} changed since registration of model {spec.name!r} (v{spec.version}): "
                f"fingerprint {embedder.profile.fingerprint[:12]}…, registered {spec.embedder_fingerprint[:12]}…"
            )
        if not getattr(embedder, "remote", False):  # an API model needs no warm-up and is checked on first use
            warm_up = embedder.prepare([_WARM_UP_TEXT])
            self._vectors(spec, embedder, [_WARM_UP_TEXT], warm_up, learn=False)  # a cold pass: kernels, caches
            self._vectors(spec, embedder, [_WARM_UP_TEXT], warm_up)
        with self._model_lock:
            self._models[spec.version] = embedder
            self._names[spec.version] = spec.name
            self._versions = frozenset(self._models)
        metrics.MODEL_READY.labels(spec.name).set(1)
        took = time.perf_counter() - started
        log.info("loaded model %s v%d (%s, %d) on %s in %.2fs",
                 spec.name, spec.version, spec.provider, spec.dim, embedder.device, took)
        return took

    def _vectors(self, spec: ModelSpec, embedder: Embedder, texts: list[str], prepared: Prepared, *,
                 learn: bool = True) -> tuple[np.ndarray, dict[int, str]]:
        """L2-normalised float32 vectors for ``texts``, checked against ``spec.dim``, and the texts rejected; the
        forward pass is timed (and, with ``learn``, updates the model's seconds per padded character)."""
        started = time.perf_counter()
        raw = embedder.embed(prepared)
        seconds = time.perf_counter() - started
        metrics.EMBED_SECONDS.labels(spec.name).observe(seconds)
        if learn:
            observed = seconds / (len(texts) * max(_cost(spec, text) for text in texts))
            known = self._seconds_per_char.get(spec.version)
            self._seconds_per_char[spec.version] = (
                observed if known is None else known + _RATE_SMOOTHING * (observed - known))
        return self._normalised(spec, raw, {})

    @staticmethod
    def _normalised(spec: ModelSpec, raw: np.ndarray, rejected: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
        """Unit rows of ``raw``, and ``rejected`` with the rows that are no vector: non-finite, or all zeros."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != spec.dim:
            raise DimensionMismatch(spec, raw.shape[-1])
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(raw.astype(np.float64), axis=1)
        rejected = dict(rejected)
        for i in np.flatnonzero(~np.isfinite(norms) | (norms == 0)):
            if int(i) not in rejected:
                rejected[int(i)] = ("zero: the model gave an all-zero vector" if norms[i] == 0 else
                                    "non_finite: the model gave a vector holding NaN or infinite values")
        scale = np.where(np.isfinite(norms) & (norms > 0), norms, np.inf)[:, None]
        unit = (raw / scale).astype(np.float32)
        unit[list(rejected)] = 0.0
        return unit, rejected


def _usable(spec: ModelSpec, embedded: Embedded) -> np.ndarray:
    """The vectors, unless the model gave some text none: then :class:`~segue.errors.InputRejected`, naming it."""
    if embedded.rejected:
        index, why = min(embedded.rejected.items())
        raise InputRejected(f"model {spec.name!r} gives no usable vector for text {index}: {why}")
    return embedded.vectors


def _cost(spec: ModelSpec, text: str) -> int:
    """What one text costs a forward pass, in characters (padded to the chunk's longest, so chunks sort by it)."""
    return max(1, min(len(text), spec.max_tokens * _CHARS_PER_TOKEN) if spec.max_tokens else len(text))


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Complete ``future`` from any thread, unless it is already done or its loop is gone."""

    def resolve() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        future.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
