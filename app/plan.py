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

    def lines(self) -> list[str]:
        """The plan as lines for the terminal."""
        hours = self.seconds / 3600
        warnings = []
        if self.truncated_in_sample:
            warnings.append(f"warning: {self.truncated_in_sample} of the {self.sample_docs} sampled documents are over "
                            f"the model's {self.max_tokens}-token input limit and are embedded truncated")
        if self.hnsw_memory_bytes > self.index_memory_cap_mb * 2**20:
            warnings.append(f"warning: the HNSW build will not fit the {self.index_memory_cap_mb} MiB cap "
                            "(SEGUE_INDEX_MAX_MAINTENANCE_WORK_MEM_MB): it will spill to disk and take longer")
        if self.dim > HNSW_MAX_DIMS:
            warnings.append(f"warning: pgvector's HNSW index takes at most {HNSW_MAX_DIMS:,} dimensions; "
                            f"{self.dim}-d vectors will be searched without an index")
        return [
            f"model {self.model}: {self.dim}-d, measured {self.throughput_docs_per_s:.1f} docs/s on {self.device} "
            f"({self.sample_docs} sampled documents)",
            f"documents to embed: {self.documents_to_embed}",
            f"estimated time: {self.seconds:,.0f} s ({hours:.2f} h) on one such worker",
            f"estimated cost: ${self.cost_usd:,.2f} at ${self.gpu_hour_usd:g}/GPU-hour",
            f"extra storage: {self.storage_bytes / 2**20:,.1f} MiB (4·{self.dim}+8 bytes a vector + {HASH_BYTES} for its hash)",
            f"HNSW build memory: {self.hnsw_memory_bytes / 2**20:,.1f} MiB (maintenance_work_mem is set to this, "
            f"up to {self.index_memory_cap_mb} MiB)",
        ] + warnings


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
         gpu_hour_usd: float, index_policy: indexes.IndexPolicy, documents_to_embed: int | None = None) -> MigrationPlan:
    """Measure ``model`` here and estimate time, cost, storage and index memory for the corpus.

    ``documents_to_embed`` defaults to every document (the model has no vectors yet).
    """
    texts = sample_texts(conn, sample)
    throughput = measure_throughput(engine, model, texts)
    tokens = engine.count_tokens(model, texts)
    (documents,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
    todo = documents if documents_to_embed is None else documents_to_embed
    seconds = todo / throughput
    return MigrationPlan(
        model=model.name,
        dim=model.dim,
        device=engine.device_of(model),
        sample_docs=len(texts),
        throughput_docs_per_s=throughput,
        documents_to_embed=todo,
        seconds=seconds,
        cost_usd=seconds / 3600 * gpu_hour_usd,
        gpu_hour_usd=gpu_hour_usd,
        storage_bytes=documents * (4 * model.dim + 8 + HASH_BYTES),
        hnsw_memory_bytes=indexes.hnsw_memory_bytes(documents, model.dim),
        index_memory_cap_mb=index_policy.max_memory_mb,
        max_tokens=model.max_tokens,
        truncated_in_sample=sum(count > model.max_tokens for count in tokens) if model.max_tokens else 0,
    )
