"""``segue migrate plan``: what a migration to a model will cost, measured before anything is written."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import psycopg

from segue.control import indexes
from segue.control.migration import MigrationError
from segue.embedding import chunking
from segue.embedding.engine import EmbeddingEngine
from segue.spec import ModelSpec
from segue.storage import documents, model_columns

HASH_BYTES = 32 + 4  # sha256 in a bytea (with its varlena header)
HNSW_MAX_DIMS = 2000  # pgvector's HNSW index on the vector type

# What filling a column of existing rows writes besides the vectors, fitted to benchmarks/bench_storage.py
# (100,000 SciFact abstracts, a 768-d column filled by write_vectors in batches of 64; see fill_wal_bytes).
PAGE_BYTES = 8192
TOAST_CHUNK_BYTES = 1996  # TOAST_MAX_CHUNK_SIZE: an out-of-line vector is stored in chunks of this much
TOAST_CHUNK_WAL_BYTES = 140  # a chunk's record and TOAST index entry, past its data
TUPLE_OVERHEAD_BYTES = 40  # a heap tuple's header, alignment and line pointer, past its columns
TOAST_TUPLE_THRESHOLD = 2032  # a wider row has its vectors moved out of line (pgvector stores them EXTERNAL)
TOAST_CHUNK_TUPLE_BYTES = 36  # a TOAST chunk's tuple header, chunk id, sequence number and length, past its data
TOAST_INDEX_ENTRY_BYTES = 28  # a chunk's entry in the TOAST table's index, at its fill
TOAST_POINTER_BYTES = 18  # what the row keeps of a vector stored out of line
LINE_POINTER_BYTES = 4
PAGE_HEADER_BYTES = 24
MOVED_ROW_WAL_BYTES = 200  # an update that is not HOT, past the whole new row: its primary-key entry
FILL_ROW_WAL_BYTES = 850  # the rest, a row: its two row locks, the changelog row and its index entries, commits
# The share of updates that are not HOT (the new row version finds no room on its page and moves), by the
# free space on the pages before the fill: measured at fillfactor 100, 90, 70 and 50.
NOT_HOT_BY_ROOM = ((0.08, 0.32), (0.18, 0.24), (0.34, 0.005), (0.58, 0.0))


@dataclass(frozen=True)
class MigrationPlan:
    model: str
    dim: int
    device: str
    sample_docs: int
    throughput_docs_per_s: float
    documents_to_embed: int
    seconds: float
    cost_usd: float
    gpu_hour_usd: float
    documents: int
    storage_bytes: int
    out_of_line: bool  # the vectors go to TOAST (rows past 2 KB with them)
    wal_bytes: int  # filling the column, each heap page logged whole once (fill_wal_bytes)
    wal_max_bytes: int  # the same, each page logged again in every checkpoint interval its rows are updated in
    checkpoint_intervals: float  # those the fill is expected to span
    dead_bytes: int  # old row versions the fill leaves dead until pruned or vacuumed
    bloat_bytes: int  # of which the heap keeps as free space after VACUUM (the rows that moved)
    not_hot_share: float  # the updates expected to move (no room on their page)
    hnsw_memory_bytes: int
    index_memory_cap_mb: int
    max_tokens: int
    truncated_in_sample: int
    tokens_in_sample: int  # after truncation: what an API bills
    price_per_million_tokens: float | None = None  # an API model's price (the cost is then by tokens)
    batch_price_per_million_tokens: float | None = None
    baseline: str | None = None  # the model reads use now, for the truncation comparison
    baseline_truncated_in_sample: int | None = None
    chunks_per_document: float | None = None  # a chunked model: the sample's chunks a document

    @property
    def tokens_to_embed(self) -> int:
        """Tokens the documents to embed are expected to take, from the sample's mean."""
        return round(self.documents_to_embed * self.tokens_in_sample / max(self.sample_docs, 1))

    def lines(self) -> list[str]:
        """The plan as lines for the terminal."""
        hours = self.seconds / 3600
        warnings = []
        if self.truncated_in_sample:
            warnings.append(f"warning: {self.truncated_in_sample} of the {self.sample_docs} sampled documents are over "
                            f"the model's {self.max_tokens}-token input limit and are embedded truncated")
        baseline = self.baseline_truncated_in_sample
        if baseline is not None and self.truncated_in_sample > baseline:
            warnings.append(f"warning: {self.model} truncates more of the sample than {self.baseline} does "
                            f"({self.truncated_in_sample} vs {baseline} of "
                            f"{self.sample_docs} documents): long documents lose text in the new model")
        if self.hnsw_memory_bytes > self.index_memory_cap_mb * 2**20:
            warnings.append(f"warning: the HNSW build will not fit the {self.index_memory_cap_mb} MiB cap "
                            "(SEGUE_INDEX_MAX_MAINTENANCE_WORK_MEM_MB): it will spill to disk and take longer")
        if self.dim > HNSW_MAX_DIMS:
            warnings.append(f"warning: pgvector's HNSW index takes at most {HNSW_MAX_DIMS:,} dimensions; "
                            f"{self.dim}-d vectors will be searched without an index")
        if self.truncated_in_sample and self.chunks_per_document:
            warnings[0] = (f"warning: {self.truncated_in_sample} chunks of the {self.sample_docs} sampled documents "
                           f"are over the model's {self.max_tokens}-token input limit with their carried title or "
                           "heading, and are embedded truncated")
        stored = "document: its vector, its hash and its chunks" if self.chunks_per_document else "vector with its hash"
        return [
            f"model {self.model}: {self.dim}-d, measured {self.throughput_docs_per_s:.1f} docs/s on {self.device} "
            f"({self.sample_docs} sampled documents, {self.tokens_in_sample:,} tokens)",
            f"documents to embed: {self.documents_to_embed} (≈ {self.tokens_to_embed:,} tokens)",
            *self._chunk_lines(),
            f"estimated time: {self.seconds:,.0f} s ({hours:.2f} h) on one such worker",
            *self._cost_lines(),
            f"extra storage: {self.storage_bytes / 2**20:,.1f} MiB ({self.storage_bytes / max(self.documents, 1):,.0f} "
            f"bytes a {stored}; 4·{self.dim}+8 bytes of data a vector{self._out_of_line_note()})",
            self._wal_line(),
            f"bloat: ≈ {self.bloat_bytes / 2**20:,.1f} MiB the table keeps after VACUUM ({self.not_hot_share:.0%} of "
            f"the updates find no room on their page and move); up to {self.dead_bytes / 2**20:,.1f} MiB of old "
            "row versions are dead until pruned or vacuumed",
            f"HNSW build memory: {self.hnsw_memory_bytes / 2**20:,.1f} MiB (maintenance_work_mem is set to this, "
            f"up to {self.index_memory_cap_mb} MiB)",
        ] + warnings

    def _chunk_lines(self) -> list[str]:
        if not self.chunks_per_document:
            return []
        chunks = round(self.documents_to_embed * self.chunks_per_document)
        return [f"chunks to embed: ≈ {chunks:,} ({self.chunks_per_document:.2f} a document in the sample); storage "
                f"and index memory below count the chunk table, ≈ {chunk_row_bytes(self.dim):,} bytes a chunk "
                "with its primary-key entry, besides the documents' column"]

    def _out_of_line_note(self) -> str:
        return ", out of line in TOAST chunks" if self.out_of_line else ", inline"

    def _wal_line(self) -> str:
        filled = "the column and the chunk table" if self.chunks_per_document else "the column"
        line = (f"WAL to fill {filled}: ≈ {self.wal_bytes / 2**20:,.1f} MiB "
                f"({self.wal_bytes / max(self.documents_to_embed, 1):,.0f} bytes a document; replicas and WAL archives "
                "receive it too)")
        if self.checkpoint_intervals >= 2:
            line += (f", up to {self.wal_max_bytes / 2**20:,.1f} MiB where its {self.checkpoint_intervals:,.0f} "
                     "checkpoint intervals log the same pages again")
        return line

    def _cost_lines(self) -> list[str]:
        if self.price_per_million_tokens is None:
            hardware = "CPU" if self.device == "cpu" else "GPU"  # what the time was measured on
            return [f"estimated cost: ${self.cost_usd:,.2f} at ${self.gpu_hour_usd:g}/{hardware}-hour "
                    "(SEGUE_GPU_HOUR_USD)"]
        lines = [f"estimated cost: ${self.cost_usd:,.2f} at ${self.price_per_million_tokens:g} per 1M tokens "
                 "(synchronous API)"]
        if self.batch_price_per_million_tokens is not None:
            batch = self.tokens_to_embed / 1e6 * self.batch_price_per_million_tokens
            lines.append(f"with the provider's batch API: ${batch:,.2f} at ${self.batch_price_per_million_tokens:g} "
                         f"per 1M tokens (saves ${self.cost_usd - batch:,.2f}; results within 24 h)")
        return lines


def sample_texts(conn: psycopg.Connection, size: int) -> list[str]:
    """Real bodies from the store (a random sample), repeated up to ``size`` when the corpus is smaller."""
    texts = documents.sample_bodies(conn, size)
    if not texts:
        raise MigrationError("there are no documents to measure the model on: publish or import some first")
    return (texts * (size // len(texts) + 1))[:size]


def measure_throughput(engine: EmbeddingEngine, model: ModelSpec, texts: list[str]) -> float:
    """Documents per second ``model`` embeds ``texts`` at (a chunked model: every chunk of them), after one warm-up
    batch."""
    pieces = [piece for text in embedded_texts(engine, model, texts) for piece in text]
    return _documents_per_second(engine, model, pieces, len(texts))


def _documents_per_second(engine: EmbeddingEngine, model: ModelSpec, pieces: list[str], documents: int) -> float:
    """Documents per second, embedding the ``pieces`` (texts or chunks) of ``documents`` after one warm-up batch."""
    engine.embed_counted_sync(model, pieces[:2])
    started = time.perf_counter()
    engine.embed_counted_sync(model, pieces)
    return documents / (time.perf_counter() - started)


def plan(conn: psycopg.Connection, engine: EmbeddingEngine, model: ModelSpec, *, sample: int,
         gpu_hour_usd: float, index_policy: indexes.IndexPolicy, documents_to_embed: int | None = None,
         baseline: ModelSpec | None = None) -> MigrationPlan:
    """Measure ``model`` here and estimate time, cost, storage and index memory for the corpus.

    ``documents_to_embed`` defaults to every document (the model has no vectors yet). An API
    model's cost is its tokens at its registered price, and its time is bounded by its
    requests and tokens per minute; a local model's cost is GPU time. ``baseline`` (the
    model reads use now) counts its truncations on the same sample, for comparison.
    """
    texts = sample_texts(conn, sample)
    pieces = [piece for text in embedded_texts(engine, model, texts) for piece in text]
    throughput = _documents_per_second(engine, model, pieces, len(texts))
    tokens = engine.count_tokens(model, pieces)
    used = sum(_given(model, count) for count in tokens)
    stored = model_columns.document_count(conn)
    todo = stored if documents_to_embed is None else documents_to_embed
    price = model.config.get("price_per_million_tokens")
    batch_price = model.config.get("batch_price_per_million_tokens")
    if model.provider == "openai":
        throughput = api_throughput(model.config, throughput, used / max(len(texts), 1))
    seconds = todo / throughput
    tokens_to_embed = todo * used / max(len(texts), 1)
    shape = table_shape(conn)
    per_document = len(pieces) / len(texts) if model.chunked else None
    # Chunk-table bytes a document; a chunk row's insert logs about what it stores (a 384-d row, foreign key
    # checked: 1,867 B of WAL, 2,081 stored).
    chunks_a_document = (per_document or 0) * chunk_row_bytes(model.dim)
    chunk_bytes, chunk_wal = round(stored * chunks_a_document), round(todo * chunks_a_document)
    not_hot = not_hot_share(shape.room)
    intervals, wal_max = checkpointed_fill_wal(conn, todo, model.dim, shape, not_hot, seconds)
    return MigrationPlan(
        model=model.name,
        dim=model.dim,
        device=engine.device_of(model),
        sample_docs=len(texts),
        throughput_docs_per_s=throughput,
        documents_to_embed=todo,
        seconds=seconds,
        cost_usd=(tokens_to_embed / 1e6 * price) if price is not None else seconds / 3600 * gpu_hour_usd,
        gpu_hour_usd=gpu_hour_usd,
        documents=stored,
        storage_bytes=round(stored * vector_storage_bytes(model.dim, shape.tuple_bytes)) + chunk_bytes,
        out_of_line=out_of_line(model.dim, shape.tuple_bytes),
        wal_bytes=fill_wal_bytes(todo, model.dim, shape.tuple_bytes, not_hot=not_hot) + chunk_wal,
        wal_max_bytes=wal_max,
        checkpoint_intervals=intervals,
        dead_bytes=round(todo * shape.tuple_bytes),
        bloat_bytes=fill_bloat_bytes(todo, shape.tuple_bytes, not_hot),
        not_hot_share=not_hot,
        hnsw_memory_bytes=indexes.hnsw_memory_bytes(round(stored * (per_document or 1)), model.dim),
        index_memory_cap_mb=index_policy.max_memory_mb,
        max_tokens=model.max_tokens,
        truncated_in_sample=_truncated(model, tokens),
        tokens_in_sample=used,
        price_per_million_tokens=price,
        batch_price_per_million_tokens=batch_price,
        baseline=baseline.name if baseline else None,
        baseline_truncated_in_sample=_truncated(baseline, engine.count_tokens(baseline, texts)) if baseline else None,
        chunks_per_document=per_document,
    )


def embedded_texts(engine: EmbeddingEngine, model: ModelSpec, texts: list[str]) -> list[list[str]]:
    """What ``model`` embeds of each text: the text itself, or a chunked model's chunks of it."""
    policy = chunking.policy_of(model)
    if policy is None:
        return [[text] for text in texts]
    spans = engine.token_spans_sync(model, texts)
    return [[chunk.text for chunk in chunking.split(policy, text, found)] for text, found in zip(texts, spans)]


def tokens_given(engine: EmbeddingEngine, model: ModelSpec, texts: list[str]) -> list[int]:
    """Tokens ``model`` is given for each text after truncation (what an API model bills): a chunked model's are
    those of every chunk, its carried title and overlaps included."""
    pieces = embedded_texts(engine, model, texts)
    counts = iter(engine.count_tokens(model, [piece for text in pieces for piece in text]))
    return [sum(_given(model, count) for count in itertools.islice(counts, len(text))) for text in pieces]


def _given(model: ModelSpec, count: int) -> int:
    """Tokens ``model`` is given of an input ``count`` tokens long: its input limit at most."""
    return min(count, model.max_tokens) if model.max_tokens else count


CHUNK_KEY_BYTES = 4 * 4 + 25  # a chunk row's four integers and a doc_id of about 24 characters
CHUNK_INDEX_ENTRY_BYTES = 40  # its primary-key entry


def chunk_row_bytes(dim: int) -> int:
    """Bytes a chunk row takes in a chunk table, its primary-key entry included: rows of its vector, hash, offsets
    and doc_id, packed whole into 8 KB pages (a 384-d row: 4 a page, 2,048 bytes; the benchmark's table of 10,502
    SciFact chunks took 2,057 a row), or a TOAST pointer past 2 KB (:func:`vector_storage_bytes`)."""
    key = CHUNK_KEY_BYTES + TUPLE_OVERHEAD_BYTES
    if out_of_line(dim, key):
        return round(vector_storage_bytes(dim, key) + key + CHUNK_INDEX_ENTRY_BYTES)
    tuple_bytes = 4 * dim + 8 + HASH_BYTES + key
    rows_per_page = max((PAGE_BYTES - PAGE_HEADER_BYTES) // tuple_bytes, 1)
    return PAGE_BYTES // rows_per_page + CHUNK_INDEX_ENTRY_BYTES


def out_of_line(dim: int, tuple_bytes: float) -> bool:
    """Whether a ``dim``-d vector goes to TOAST: when it would take the row (``tuple_bytes``) past 2 KB."""
    return tuple_bytes + 4 * dim + 8 > TOAST_TUPLE_THRESHOLD


def vector_storage_bytes(dim: int, tuple_bytes: float) -> float:
    """Bytes a ``dim``-d vector and its hash take in rows of ``tuple_bytes``.

    Inline: its 4·dim+8 bytes. Out of line (:func:`out_of_line`): a pointer in the row, and
    chunks of up to 1,996 bytes, each a tuple with a header and an index entry, written into
    8 KB pages one after another (a chunk that does not fit the page's rest starts a new one).
    ``tests/test_migration.py`` holds it to what PostgreSQL stores at 768 and 1,536 dims.
    """
    vector = 4 * dim + 8
    if not out_of_line(dim, tuple_bytes):
        return vector + HASH_BYTES
    full, rest = divmod(vector, TOAST_CHUNK_BYTES)
    chunks = [TOAST_CHUNK_BYTES] * full + ([rest] if rest else [])
    rows, pages, room = 100, 1, PAGE_BYTES - PAGE_HEADER_BYTES
    for chunk in chunks * rows:
        size = -(-(TOAST_CHUNK_TUPLE_BYTES + chunk) // 8) * 8 + LINE_POINTER_BYTES  # tuples are 8-byte aligned
        if size > room:
            pages, room = pages + 1, PAGE_BYTES - PAGE_HEADER_BYTES
        room -= size
    return pages * PAGE_BYTES / rows + len(chunks) * TOAST_INDEX_ENTRY_BYTES + TOAST_POINTER_BYTES + HASH_BYTES


def api_throughput(config: dict, measured: float, tokens_per_doc: float) -> float:
    """Docs/s of an API model: the measured rate times its concurrency, within its per-minute budgets."""
    by_tokens = config["tokens_per_minute"] / 60 / max(tokens_per_doc, 1)
    by_requests = config["requests_per_minute"] / 60 * config["max_inputs_per_request"]
    return min(measured * config["concurrency"], by_tokens, by_requests)


def _truncated(model: ModelSpec, tokens: list[int]) -> int:
    return sum(count > model.max_tokens for count in tokens) if model.max_tokens else 0


@dataclass(frozen=True)
class TableShape:
    """The ``documents`` heap as it is now: what an UPDATE of each row will rewrite."""

    rows: int
    heap_bytes: int
    tuple_bytes: float  # a row's heap tuple: its text inline (compressed past 2 KB), vectors out of line

    @property
    def room(self) -> float:
        """The share of the heap's pages that is free space."""
        return min(max(1 - self.rows * self.tuple_bytes / self.heap_bytes, 0.0), 1.0) if self.heap_bytes else 0.0

    @property
    def rows_per_page(self) -> float:
        """Rows on a heap page, on average."""
        return self.rows * PAGE_BYTES / self.heap_bytes if self.heap_bytes else 0.0


def table_shape(conn: psycopg.Connection) -> TableShape:
    """The documents heap's size and its tuples' mean bytes, from the columns' stored widths (``pg_stats``).

    Without statistics yet (no ANALYZE), a tuple is taken to fill its share of the heap: no room.
    """
    rows = model_columns.document_count(conn)
    heap, widths = documents.heap_stats(conn)
    if not rows:
        return TableShape(0, heap, 0.0)
    tuple_bytes = float(widths) + TUPLE_OVERHEAD_BYTES if widths else heap / rows
    return TableShape(rows, heap, tuple_bytes)


def not_hot_share(room: float) -> float:
    """The share of a fill's updates that cannot stay on their page, by the pages' free space (measured)."""
    rooms, shares = zip(*NOT_HOT_BY_ROOM)
    return float(np.interp(room, rooms, shares))


def page_images_per_row(intervals: float, rows_per_page: float) -> float:
    """Full-page images a row's update costs, in units of its own tuple's bytes.

    A page is written to the WAL whole (its free space left out) the first time it changes after each
    checkpoint: a fill within one checkpoint interval logs each page once, one tuple's bytes a row. Over
    K intervals, a page whose r rows are updated at random times is logged K·(1 − (1 − 1/K)^r) times,
    which tends to r: an image of the page for each row. That is the bound; rows written together sit
    together in doc_id order too, which a backfill follows (the benchmark's 8 checkpoints over a fill
    logged each page 2 times, not this formula's 4.6).
    """
    if intervals <= 1:
        return 1.0
    return intervals * (1 - (1 - 1 / intervals) ** rows_per_page)


def fill_wal_bytes(rows: int, dim: int, tuple_bytes: float, *, not_hot: float, images: float = 1.0) -> int:
    """WAL bytes that writing a ``dim``-d vector into each of ``rows`` existing rows produces.

    Per row, with V = 4·dim + 8 (the vector as stored) and T = the row's heap tuple (``tuple_bytes``:
    mostly its text, inline and compressed by PostgreSQL past 2 KB):

        V + 140·⌈V / 1996⌉      the vector into TOAST, in chunks with their records and index entries
      + not_hot · (T + 200)     the row's new version, logged whole when it moves to another page
      + images · T              full-page images of the heap page (1 within a checkpoint interval)
      + 850                     two row locks, the changelog row and its indexes, commits

    ``benchmarks/bench_storage.py`` measured 100,000 SciFact abstracts (T = 1,243 bytes) taking a
    768-d column in batches of 64 within one checkpoint interval: 5,913 bytes a row with 32 % of the
    updates moving (fillfactor 100) and 5,458 with 0.5 % (fillfactor 70), the formula's 5,915 and
    5,460; 4,030 and 8,974 bytes a row for 384-d and 1,536-d columns (10,000 documents, fillfactor 70),
    the formula's 3,850 and 8,880. An HNSW index on another column adds about 5 KB to each update
    that moves, and most of the time (``--old-index``, 384-d, 20,000 documents: 7,542 bytes a row at
    fillfactor 100 against the formula's 5,940).
    """
    vector = 4 * dim + 8
    per_row = (vector + TOAST_CHUNK_WAL_BYTES * math.ceil(vector / TOAST_CHUNK_BYTES)
               + not_hot * (tuple_bytes + MOVED_ROW_WAL_BYTES) + images * tuple_bytes + FILL_ROW_WAL_BYTES)
    return round(rows * per_row)


def checkpointed_fill_wal(conn: psycopg.Connection, rows: int, dim: int, shape: TableShape, not_hot: float,
                          seconds: float) -> tuple[float, int]:
    """(checkpoint intervals, most WAL bytes) of a fill lasting ``seconds`` under this server's settings.

    A checkpoint comes every ``checkpoint_timeout`` or every max_wal_size / (1 + checkpoint_completion_target)
    of WAL, whichever is first; the WAL's own volume is solved for by iteration. The bytes are
    :func:`fill_wal_bytes` with :func:`page_images_per_row`'s bound on the page images.
    """
    settings = dict(conn.execute(
        "SELECT name, setting::float8 * CASE unit WHEN 'MB' THEN 1048576 WHEN 'min' THEN 60 ELSE 1 END"
        " FROM pg_settings WHERE name IN ('checkpoint_timeout', 'max_wal_size', 'checkpoint_completion_target')"
    ).fetchall())
    per_checkpoint = settings["max_wal_size"] / (1 + settings["checkpoint_completion_target"])
    intervals = 1 + seconds / settings["checkpoint_timeout"]
    wal = 0
    for _ in range(3):
        images = page_images_per_row(intervals, shape.rows_per_page)
        wal = fill_wal_bytes(rows, dim, shape.tuple_bytes, not_hot=not_hot, images=images)
        intervals = max(intervals, 1 + wal / per_checkpoint)
    return intervals, wal


def fill_bloat_bytes(rows: int, tuple_bytes: float, not_hot: float) -> int:
    """Heap bytes a fill leaves free for good (VACUUM makes them reusable, the file does not shrink).

    A HOT update's old version is reclaimed on its own page; one that moves leaves its whole tuple
    behind. In the benchmark (fillfactor 100, 32 % of the updates moving, T = 1,243 bytes) the heap
    grew by 479 bytes a row: this formula's 398 and each row's new hash and TOAST pointer (56 bytes).
    """
    return round(rows * not_hot * tuple_bytes)
