"""``segue migrate plan``: what a migration to a model will cost, measured before anything is written."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

from segue import indexes
from segue.corpus import scifact_documents
from segue.engine import EmbeddingEngine
from segue.spec import ModelSpec

HASH_BYTES = 32 + 4  # sha256 in a bytea (with its varlena header)
HNSW_MAX_DIMS = 2000  # pgvector's HNSW index on the vector type


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
    storage_bytes: int
    hnsw_memory_bytes: int
    index_memory_cap_mb: int
    max_tokens: int
    truncated_in_sample: int
    tokens_in_sample: int  # after truncation: what an API bills
    price_per_million_tokens: float | None = None  # an API model's price (the cost is then by tokens)
    batch_price_per_million_tokens: float | None = None
    baseline: str | None = None  # the model reads use now, for the truncation comparison
    baseline_truncated_in_sample: int | None = None

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
        return [
            f"model {self.model}: {self.dim}-d, measured {self.throughput_docs_per_s:.1f} docs/s on {self.device} "
            f"({self.sample_docs} sampled documents, {self.tokens_in_sample:,} tokens)",
            f"documents to embed: {self.documents_to_embed} (≈ {self.tokens_to_embed:,} tokens)",
            f"estimated time: {self.seconds:,.0f} s ({hours:.2f} h) on one such worker",
            *self._cost_lines(),
            f"extra storage: {self.storage_bytes / 2**20:,.1f} MiB (4·{self.dim}+8 bytes a vector + {HASH_BYTES} for its hash)",
            f"HNSW build memory: {self.hnsw_memory_bytes / 2**20:,.1f} MiB (maintenance_work_mem is set to this, "
            f"up to {self.index_memory_cap_mb} MiB)",
        ] + warnings

    def _cost_lines(self) -> list[str]:
        if self.price_per_million_tokens is None:
            return [f"estimated cost: ${self.cost_usd:,.2f} at ${self.gpu_hour_usd:g}/GPU-hour"]
        lines = [f"estimated cost: ${self.cost_usd:,.2f} at ${self.price_per_million_tokens:g} per 1M tokens "
                 "(synchronous API)"]
        if self.batch_price_per_million_tokens is not None:
            batch = self.tokens_to_embed / 1e6 * self.batch_price_per_million_tokens
            lines.append(f"with the provider's batch API: ${batch:,.2f} at ${self.batch_price_per_million_tokens:g} "
                         f"per 1M tokens (saves ${self.cost_usd - batch:,.2f}; results within 24 h)")
        return lines


def sample_texts(conn: psycopg.Connection, size: int) -> list[str]:
    """Real bodies from the store (a random sample), or the bundled corpus when it is empty."""
    rows = conn.execute("SELECT body FROM documents TABLESAMPLE SYSTEM (10) LIMIT %s", (size,)).fetchall()
    if len(rows) < size:
        rows = conn.execute("SELECT body FROM documents LIMIT %s", (size,)).fetchall()
    texts = [body for (body,) in rows]
    if len(texts) < size:
        texts += [d.text for d in scifact_documents(size - len(texts))]
    return texts


def measure_throughput(engine: EmbeddingEngine, model: ModelSpec, texts: list[str]) -> float:
    """Documents per second embedding ``texts`` (after one warm-up batch)."""
    engine.embed_sync(model, texts[:2])
    started = time.perf_counter()
    engine.embed_sync(model, texts)
    return len(texts) / (time.perf_counter() - started)


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
    throughput = measure_throughput(engine, model, texts)
    tokens = engine.count_tokens(model, texts)
    used = sum(min(count, model.max_tokens) if model.max_tokens else count for count in tokens)
    (documents,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
    todo = documents if documents_to_embed is None else documents_to_embed
    price = model.config.get("price_per_million_tokens")
    batch_price = model.config.get("batch_price_per_million_tokens")
    if model.provider == "openai":
        throughput = api_throughput(model.config, throughput, used / max(len(texts), 1))
    seconds = todo / throughput
    tokens_to_embed = todo * used / max(len(texts), 1)
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
        storage_bytes=documents * (4 * model.dim + 8 + HASH_BYTES),
        hnsw_memory_bytes=indexes.hnsw_memory_bytes(documents, model.dim),
        index_memory_cap_mb=index_policy.max_memory_mb,
        max_tokens=model.max_tokens,
        truncated_in_sample=_truncated(model, tokens),
        tokens_in_sample=used,
        price_per_million_tokens=price,
        batch_price_per_million_tokens=batch_price,
        baseline=baseline.name if baseline else None,
        baseline_truncated_in_sample=_truncated(baseline, engine.count_tokens(baseline, texts)) if baseline else None,
    )


def api_throughput(config: dict, measured: float, tokens_per_doc: float) -> float:
    """Docs/s of an API model: the measured rate times its concurrency, within its per-minute budgets."""
    by_tokens = config["tokens_per_minute"] / 60 / max(tokens_per_doc, 1)
    by_requests = config["requests_per_minute"] / 60 * config["max_inputs_per_request"]
    return min(measured * config["concurrency"], by_tokens, by_requests)


def _truncated(model: ModelSpec, tokens: list[int]) -> int:
    return sum(count > model.max_tokens for count in tokens) if model.max_tokens else 0
