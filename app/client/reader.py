"""The reader client: vector search over Segue's versioned pgvector columns, during and after a migration.

Upstream services import :class:`SegueReader`. It reads ``serving`` (which model
readers use; re-read at most every ``serving_ttl_s``, so a cutover is picked up within
seconds) and the active ``migrations`` row (whose other side is "the other model"),
and searches in one of four modes:

``incremental`` (default)
    The read model ranks the documents whose vector for it is *current*
    (``embedding_vN_sha256 = content_sha256``). Documents lacking one but current in
    the other model are ranked by the other model's column, with the query embedded
    by that model, and the two lists are merged by reciprocal rank fusion (RRF, k=60).
    Every returned hit that only the fallback found triggers a read-miss event, so a
    worker re-embeds it for the read model. The fallback is skipped (no second
    embedding) while the counters say every document has a current read-model vector.
``parallel``
    Both models of the active migration rank their current vectors; RRF merges them.
``bridged``
    What readers get from the migration's *new* model before its column is complete: the
    query is embedded by the new model only; documents with a current new vector are ranked
    in the new space, the others on the old column with the query carried there by the
    migration's adapter (:mod:`segue.control.bridging`) and averaged with the old model's own
    vector of it, their scores calibrated onto the new model's scale, and the two lists merged
    by score. Hits the adapter found trigger read misses for the new model. An adopted old
    model (which Segue cannot run) is searched with the carried query alone. Without an adapter that passed, it searches as ``incremental``
    (and says why once). ``incremental`` reading the new model (after a cutover, or pinned
    with ``read_model``) uses the adapter the same way once one passed.
``routing``
    A policy (default :func:`route_by_query_shape`) picks one model per query: the read
    model, or the other model if the counters say its column is complete (a half-filled
    column would rank part of the corpus). The read model searches as in ``incremental``.

A query vector is only ever compared with the column of the model that embedded it:
:func:`check_query` checks its width and the embedding model's fingerprint against the
registry before every column query. Scores are cosine similarities (``1 - (v <=> q)``)
when one column ranked the hits and fused RRF scores when two did.

Read misses go through a :class:`~segue.client.readmisses.ReadMissPublisher`: deduplicated per
(document, model) for ``read_miss_dedup_s``, at most ``read_miss_rate`` a second, sent
without slowing a query; :meth:`SegueReader.close` flushes them.

Models are loaded before their first query. Whenever the reader reads its view (when it is
created, then as searches come, at most every ``serving_ttl_s``), a background thread loads
and warms, through the engine, the models it may embed queries with that the engine has not
loaded: the read model and the active migration's other side. So a reader created before
``segue migrate start`` has the new model warm within a view refresh of the start, and its first
search on it (in ``parallel`` or ``bridged`` mode, or once a cutover makes it the read model)
pays no model load. An API model is loaded without a request (the engine warms only local
models). A reader warms each model at most once; a warm-up that fails is logged as a warning,
and a search then loads the model on demand. Searches on the models already loaded go on while
one warms (the engine loads beside its forward passes).

The reader is made for threaded host services: queries borrow connections from a pool
(``pool_size``), so concurrent searches run in parallel in PostgreSQL. Importing it
loads no model code; torch comes only when a local model is first loaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool

from segue.client.readmisses import ReadMissPublisher
from segue.client.search import (
    IncompatibleQuery,
    QueryVector,
    SearchHit,
    check_query,
    nearest,
    nearest_bridged,
    reciprocal_rank_fusion,
)
from segue.control import bridging, migration, registry
from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.errors import EngineStopped
from segue.quality.shadow import TOP_K, QueryLog
from segue.settings import Settings, load_settings
from segue.spec import ModelSpec
from segue.storage import adapters, connections, model_columns

log = logging.getLogger("segue.client.reader")

MODES = ("incremental", "parallel", "routing", "bridged")

RoutingPolicy = Callable[[str, list[ModelSpec]], ModelSpec]


@dataclass(frozen=True)
class SearchResult:
    """The hits of one search, the models whose columns were queried, and the read misses queued."""

    mode: str
    models: tuple[str, ...]
    hits: list[SearchHit]
    read_misses: list[str]


def route_by_query_shape(query_text: str, candidates: list[ModelSpec]) -> ModelSpec:
    """The default routing policy: short FAQ-like queries to the lightest model, others to the read model.

    Short means at most 6 words, or a question (ending in "?") of at most 12 words.
    ``candidates`` lists the read model first, then the other side of the active migration
    when every document has a current vector for it.
    """
    words = len(query_text.split())
    short = words <= 6 or (query_text.rstrip().endswith("?") and words <= 12)
    return min(candidates, key=lambda spec: spec.dim) if short else candidates[0]


class _OutdatedView(Exception):
    """A model of the reader's view was retired since it was read."""


@dataclass(frozen=True)
class _Query:
    """One search's query: its text, and the vectors the caller gave for some models."""

    text: str
    vectors: dict[str, QueryVector]


@dataclass(frozen=True)
class _Bridge:
    """The active migration's new and old models, and the adapter between them (None: ``refusal`` says why)."""

    new: ModelSpec
    old: ModelSpec
    adapter: adapters.StoredAdapter | None
    refusal: str | None


@dataclass(frozen=True)
class _View:
    """What readers use, as of ``loaded_at``: the read model, the other model, the live models by name, and the
    bridge between the active migration's models."""

    read: ModelSpec
    other: ModelSpec | None
    live: dict[str, ModelSpec]
    loaded_at: float
    bridge: _Bridge | None = None

    @property
    def candidates(self) -> list[ModelSpec]:
        return [self.read] + ([self.other] if self.other else [])


class SegueReader:
    """Searches the corpus with the serving model, falling back to the other model mid-migration.

    Thread-safe: queries borrow connections from a pool. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        database_url: str | None = None,
        engine: EmbeddingEngine | None = None,
        mode: str = "incremental",
        routing_policy: RoutingPolicy | None = None,
        read_miss_rate: float = 50.0,
        read_miss_dedup_s: float = 60.0,
        serving_ttl_s: float = 2.0,
        read_model: str | None = None,
        pool_size: int = 8,
    ):
        """Connect to ``database_url`` (default: ``SEGUE_DATABASE_URL``; a reader starts no embedded service).

        ``engine`` None: the reader creates (and closes) its own, loading models on first use.
        ``mode`` is the default for :meth:`search`; ``routing_policy`` picks the model in routing
        mode. ``read_miss_rate`` 0 disables read-miss events. ``read_model`` pins the reader to a
        live model instead of the serving one (a canary reading the new model mid-migration,
        whose misses drive lazy re-embedding). ``pool_size`` bounds the connections, so the
        searches running at once.
        """
        _check_mode(mode)
        self._settings = settings or load_settings()
        self._url = database_url or self._settings.database_url
        if not self._url:
            raise ValueError("SegueReader needs a database: pass database_url= or set SEGUE_DATABASE_URL "
                             "(segue services status prints the embedded one)")
        self._mode = mode
        self._policy = routing_policy or route_by_query_shape
        self._serving_ttl_s = serving_ttl_s
        self._read_model = read_model
        self._misses = ReadMissPublisher(self._settings, read_miss_rate, read_miss_dedup_s)
        self._query_log = QueryLog(rate=self._settings.query_log_rate, keep_text=self._settings.query_log_text == "keep",
                                   low_score=self._settings.drift_low_score)
        self._lock = threading.Lock()  # guards the view and _closed
        self._pool = ConnectionPool(self._url, min_size=1, max_size=pool_size, name="segue-reader",
                                    kwargs={"autocommit": True, "application_name": "segue-reader"},
                                    configure=self._configure, open=True)
        self._view: _View | None = None
        self._refusals_said: set[str] = set()
        self._closed = False
        self._owns_engine = engine is None
        self._engine = engine or EmbeddingEngine.from_settings(self._settings)
        self._warm_ups: set[int] = set()  # versions whose warm-up this reader started (guarded by _lock)
        threading.Thread(target=self._read_first_view, name="segue-reader-first-view", daemon=True).start()

    def __enter__(self) -> SegueReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_miss_stats(self) -> dict[str, int]:
        """Read-miss events published, deduplicated, dropped over the rate bound, and failed."""
        return self._misses.stats()

    def search(
        self, query_text: str, k: int = 10, filters: dict | None = None, *, mode: str | None = None,
        vectors: Mapping[str, QueryVector] | None = None,
    ) -> SearchResult:
        """The top ``k`` documents for ``query_text`` whose metadata contains ``filters``.

        ``vectors`` gives the query already embedded by some models, by name: those are used
        instead of embedding the text here (a host service that embeds its own queries), and
        a model with adopted vectors, which Segue cannot run, needs one.
        """
        mode = mode or self._mode
        _check_mode(mode)
        _check_request(k, filters)
        query = _Query(query_text, dict(vectors or {}))
        run = {"incremental": self._incremental, "parallel": self._parallel, "routing": self._routing,
               "bridged": self._bridged}[mode]
        result = self._with_view(lambda view: run(view, query, k, filters))
        if self._query_log.sampled():
            self._log_query(query)
        return result

    def search_vector(
        self, vector: Any, model: str, *, fingerprint: str, k: int = 10, filters: dict | None = None
    ) -> SearchResult:
        """Search ``model``'s column with a query the caller embedded with the model of ``fingerprint``."""
        _check_request(k, filters)

        def run(view: _View) -> SearchResult:
            spec = view.live.get(model)
            if spec is None:
                raise IncompatibleQuery(f"no live model named {model!r} (live: {', '.join(sorted(view.live))})")
            return SearchResult("vector", (spec.name,), self._rank(spec, vector, fingerprint, k, filters), [])

        return self._with_view(run)

    def close(self) -> None:
        """Flush queued read misses, then close the connection and the engine if the reader owns it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._misses.close()
        self._pool.close()
        if self._owns_engine:
            self._engine.close()

    # -- modes --------------------------------------------------------------------------------

    def _incremental(self, view: _View, query: _Query, k: int, filters: dict | None) -> SearchResult:
        read, other = view.read, view.other
        bridge = view.bridge
        if bridge is not None and bridge.adapter is not None and read.version == bridge.new.version:
            return replace(self._bridged(view, query, k, filters), mode="incremental")
        primary = self._rank_text(read, query, k, filters)
        if other is None or not self._incomplete(read):
            return SearchResult("incremental", (read.name,), primary, [])
        fallback = self._rank_text(other, query, k, filters, lacking=read)
        hits = reciprocal_rank_fusion([primary, fallback], k)
        # Adopted vectors cannot be recomputed: no read miss would help.
        missed = [hit.doc_id for hit in hits if hit.model == other.name] if providers.embeds(read) else []
        return SearchResult("incremental", (read.name, other.name), hits, self._misses.offer(missed, read.name))

    def _parallel(self, view: _View, query: _Query, k: int, filters: dict | None) -> SearchResult:
        specs = view.candidates
        rankings = [self._rank_text(spec, query, k, filters) for spec in specs]
        hits = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings, k)
        return SearchResult("parallel", tuple(spec.name for spec in specs), hits, [])

    def _bridged(self, view: _View, query: _Query, k: int, filters: dict | None) -> SearchResult:
        bridge = view.bridge
        if bridge is None or bridge.adapter is None:
            self._say_refusal(bridge.refusal if bridge else "no migration is in progress: nothing to bridge")
            return self._incremental(view, query, k, filters)
        new, old = bridge.new, bridge.old
        vector = self._query_vector(new, query)
        if not self._incomplete(new):
            return SearchResult("bridged", (new.name,), self._rank(new, vector, new.fingerprint, k, filters), [])
        old_vector = self._query_vector(old, query) if old.name in query.vectors or providers.embeds(old) else None
        with self._connection() as conn:
            hits = nearest_bridged(conn, new, old, bridge.adapter.space_map, vector, k, old_query=old_vector,
                                   filters=filters)
        missed = [hit.doc_id for hit in hits if hit.model != new.name] if providers.embeds(new) else []
        return SearchResult("bridged", (new.name, old.name), hits, self._misses.offer(missed, new.name))

    def _say_refusal(self, refusal: str) -> None:
        """Log why bridged reads search as incremental, once per reason."""
        with self._lock:
            first = refusal not in self._refusals_said
            self._refusals_said.add(refusal)
        if first:
            log.warning("bridged reads search as incremental: %s", refusal)

    def _routing(self, view: _View, query: _Query, k: int, filters: dict | None) -> SearchResult:
        candidates = [view.read] + [spec for spec in view.candidates[1:] if not self._incomplete(spec)]
        chosen = self._policy(query.text, list(candidates))
        spec = next((c for c in candidates if c.version == getattr(chosen, "version", None)), None)
        if spec is None:
            raise ValueError(
                f"the routing policy chose {getattr(chosen, 'name', chosen)!r}, "
                f"not one of {[c.name for c in candidates]}"
            )
        if spec.version == view.read.version:  # with the fallback for documents it lacks
            return replace(self._incremental(view, query, k, filters), mode="routing")
        return SearchResult("routing", (spec.name,), self._rank_text(spec, query, k, filters), [])

    # -- columns ------------------------------------------------------------------------------

    def _rank_text(self, spec: ModelSpec, query: _Query, k: int, filters: dict | None,
                   lacking: ModelSpec | None = None) -> list[SearchHit]:
        """Rank ``spec``'s column with the query as ``spec`` embeds it (given by the caller, or embedded here)."""
        return self._rank(spec, self._query_vector(spec, query), spec.fingerprint, k, filters, lacking)

    def _query_vector(self, spec: ModelSpec, query: _Query) -> Any:
        """The query as ``spec`` embeds it: the caller's vector (checked against ``spec``), or embedded here."""
        given = query.vectors.get(spec.name)
        if given is not None:
            return check_query(spec, given.vector, given.fingerprint)
        if not providers.embeds(spec):
            raise IncompatibleQuery(
                f"model {spec.name!r} holds adopted vectors and Segue cannot embed queries for it: pass the query"
                f" embedded by that model (vectors={{{spec.name!r}: QueryVector(…)}}) or bind the model to a provider"
                " (segue models bind)")
        return self._embed_query(spec, query.text)

    def _embed_query(self, spec: ModelSpec, text: str) -> Any:
        """``text`` embedded by ``spec``; :class:`IncompatibleQuery` when the model gives it no usable vector."""
        embedded = self._engine.embed_counted_sync(spec, [text])
        if embedded.rejected:
            raise IncompatibleQuery(f"model {spec.name!r} gives no usable vector for this query ({embedded.rejected[0]})")
        return embedded.vectors[0]

    def _rank(self, spec: ModelSpec, vector: Any, fingerprint: str, k: int, filters: dict | None,
              lacking: ModelSpec | None = None) -> list[SearchHit]:
        """The ``k`` nearest current vectors of ``spec`` (see :func:`segue.client.search.nearest`)."""
        query = check_query(spec, vector, fingerprint)
        with self._connection() as conn:
            return nearest(conn, spec, query, k, filters=filters, lacking=lacking)

    def _log_query(self, query: _Query) -> None:
        """Log the query with the read model's vector and best hits, for shadow evaluation and drift."""
        read = self._current_view().read
        if read.name not in query.vectors and not providers.embeds(read):
            return
        vector = self._query_vector(read, query)
        with self._connection() as conn:
            self._query_log.record(conn, read, query.text, vector, nearest(conn, read, vector, TOP_K))

    def _incomplete(self, spec: ModelSpec) -> bool:
        """Whether some document lacks a current vector for ``spec`` (from the exact counters)."""
        with self._connection() as conn:
            counts = model_columns.vector_counts(conn, spec.version)
        if counts is None:  # retired since the view was read: its column is gone too
            raise _OutdatedView(spec.name)
        current, total = counts
        return total > current

    # -- serving state ------------------------------------------------------------------------

    def _with_view(self, run: Callable[[_View], SearchResult]) -> SearchResult:
        """Run with the current view; once more with a fresh one if a finished or aborted migration retired a model
        of it (its column dropped)."""
        try:
            return run(self._current_view())
        except (errors.UndefinedColumn, _OutdatedView):
            return run(self._current_view(refresh=True))

    def _current_view(self, *, refresh: bool = False) -> _View:
        with self._lock:
            view = self._view
        if refresh or view is None or time.monotonic() - view.loaded_at >= self._serving_ttl_s:
            with self._connection() as conn:
                view = self._load_view(conn, self._read_model, view.bridge if view else None)
            with self._lock:
                self._view = view
            self._warm_up(view)
        return view

    def _read_first_view(self) -> None:
        """Read the view as the reader is created, so its models start warming before the first search."""
        try:
            self._current_view()
        except Exception as exc:  # noqa: BLE001 - the first search reads the view again and raises the error
            log.debug("the reader's view was not read ahead of its first search: %s", exc)

    def _warm_up(self, view: _View) -> None:
        """Start loading, in a background thread, the models ``view`` may embed queries with that the engine has not
        loaded and this reader has not tried to warm yet."""
        loaded = self._engine.loaded()
        with self._lock:
            specs = [spec for spec in view.candidates if providers.embeds(spec)
                     and spec.version not in loaded and spec.version not in self._warm_ups]
            self._warm_ups.update(spec.version for spec in specs)
        if specs:
            threading.Thread(target=self._warm, args=(specs,), name="segue-reader-warm-up", daemon=True).start()

    def _warm(self, specs: list[ModelSpec]) -> None:
        """Load and warm ``specs`` one after another; a failure is logged, and a search loads that model on demand."""
        for spec in specs:
            if self._closed:
                return
            try:
                seconds = asyncio.run(self._engine.ensure_loaded([spec]))
            except EngineStopped:  # the reader, or whoever owns the engine, closed it
                return
            except Exception as exc:  # noqa: BLE001 - a warm-up never fails a search: the search loads on demand
                log.warning("could not warm model %s (v%d) ahead of its first search, which will load it: %s",
                            spec.name, spec.version, exc)
            else:
                if spec.version in seconds:
                    log.info("warmed model %s (v%d) ahead of its first search in %.2fs",
                             spec.name, spec.version, seconds[spec.version])

    def _connection(self):
        """A pooled connection, for one query (a context manager)."""
        if self._closed:
            raise RuntimeError("the reader is closed")
        return self._pool.connection()

    def _configure(self, conn: psycopg.Connection) -> None:
        """Each pooled connection: Segue's schema and vector types, and exact-order iterative HNSW scans."""
        connections.configure(conn, self._settings)
        # HNSW filters after the scan, so a query for few qualifying rows (the fallback's documents
        # lacking a read-model vector, a narrow metadata filter) could come back short; pgvector
        # >= 0.8 can keep scanning instead, in exact distance order.
        (version,) = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        if tuple(int(part) for part in version.split(".")[:2]) >= (0, 8):
            conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', false)")

    @staticmethod
    def _load_view(conn, read_model: str | None, bridge: _Bridge | None) -> _View:
        models = registry.list_models(conn)
        live = {m.spec.name: m.spec for m in models if m.state == "live"}
        if read_model is not None:
            if read_model not in live:
                raise ValueError(f"read_model {read_model!r} is not a live model (live: {', '.join(sorted(live))})")
            read = live[read_model]
        else:
            read = next((m.spec for m in models if m.serving_reads), None)
        if read is None:
            raise RuntimeError("no model serves reads: register one first")
        by_version = {spec.version: spec for spec in live.values()}
        other = None
        active = migration.active_migration(conn)
        if active is not None and read.version in (active.from_version, active.to_version):
            other = by_version.get(active.to_version if read.version == active.from_version else active.from_version)
        new, old = (by_version.get(active.to_version), by_version.get(active.from_version)) if active else (None, None)
        if new is None or old is None:
            return _View(read, other, live, time.monotonic())
        loaded = bridge.adapter if bridge is not None else None
        try:
            adapter, refusal = bridging.usable(conn, new, old, loaded=loaded), None
        except bridging.BridgeRefused as error:
            adapter, refusal = None, str(error)
        return _View(read, other, live, time.monotonic(), _Bridge(new, old, adapter, refusal))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


def _check_request(k: int, filters: dict | None) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    if filters is not None and not isinstance(filters, dict):
        raise TypeError(f"filters must be a dict (matched with metadata @> filters), not {type(filters).__name__}")
