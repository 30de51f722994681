"""Long documents: a migration from truncated all-MiniLM-L6-v2 to the same model chunked, through the CLI.

    python benchmarks/bench_chunking.py               # 5,183 SciFact abstracts (about 20 min on 2 cores)
    python benchmarks/bench_chunking.py --docs 1000   # a quick look (nDCG on a partial corpus)

Prints:

* quality: SciFact nDCG@10 of MiniLM truncated at 256 tokens (one vector a document, what
  Segue did before chunking) and of MiniLM over chunks, documents ranked by their best
  chunk, with the verdict ``segue eval --scifact`` records between the two, and what
  ``segue migrate cutover`` answers (its gate reads that verdict and the coverage);
* the migration itself: ``segue migrate start --to … --chunk-size …`` and ``segue backfill
  --wait`` against a running ``segue worker``, with chunks, tokens and the backfill's rate;
* an edit of one paragraph of a 20-chunk document: chunks the worker re-embedded (from the
  changelog's detail) of those it holds;
* storage: the chunk table (with its HNSW index) beside one vector a document, and the
  write rate of documents with 5 chunks each beside one vector each, through the store's own
  calls (no model: the write path alone).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness and benchmarks.common

from benchmarks.common import production_env  # noqa: E402
from segue.control import registry  # noqa: E402
from segue.devtools.corpus import scifact_documents, store_embedded  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402
from segue.embedding.engine import EmbeddingEngine  # noqa: E402
from segue.schemas.events import SourcePosition  # noqa: E402
from segue.spec import ModelProfile  # noqa: E402
from segue.storage import connections, model_columns  # noqa: E402
from segue.storage.chunks import ChunkRow  # noqa: E402
from segue.storage.documents import DocumentRow, Store  # noqa: E402
from tests.harness import Harness, change, run_segue, wait_for  # noqa: E402

TRUNCATED, CHUNKED = "minilm", "minilm-chunked"


POLICY = {"splitter": "sentences", "chunk-size": "224", "chunk-overlap": "48", "chunk-title": "first_line"}


@dataclass(frozen=True)
class ChunkingResult:
    """What one run measured (see the module's docstring)."""

    documents: int
    chunks: int
    backfill_s: float
    ndcg_truncated: float
    ndcg_chunked: float
    verdict: str
    evaluation: str  # segue eval's lines
    cutover_exit: int
    edit: tuple[int, int]  # (chunks re-embedded, chunks of the document)
    bytes_a_document: tuple[float, float]  # (one vector, the chunk table and its indexes)
    documents_per_s: tuple[float, float]  # written by the store: (one vector each, 5 chunks each)

    def describe(self) -> str:
        return (f"nDCG@10 {self.ndcg_truncated:.4f} truncated vs {self.ndcg_chunked:.4f} best chunk "
                f"(Δ {self.ndcg_chunked - self.ndcg_truncated:+.4f}): {self.verdict}")


def measure(docs: int | None = None, policy: dict[str, str] = POLICY, *, say=print) -> ChunkingResult:
    """Store ``docs`` SciFact abstracts with truncated MiniLM, migrate to MiniLM chunked by ``policy`` (the
    ``migrate start`` options) through the CLI, and measure (``say`` prints as it goes)."""
    h = Harness(Path(tempfile.mkdtemp(prefix="segue-bench-chunking-")))
    env = {**production_env(h), "SEGUE_MAX_TEXT_BYTES": "200000"}
    try:
        corpus = list(scifact_documents(docs))
        engine = EmbeddingEngine(device="cpu")
        with connections.connect(h.settings, h.database_url) as conn:
            truncated = registry.register_model(conn, TRUNCATED, str(minilm_path()))
            started = time.perf_counter()
            store_embedded(conn, corpus, {truncated: engine.embed_sync(truncated, [d.text for d in corpus])})
            say(f"stored {len(corpus)} abstracts with {TRUNCATED} (truncated at 256 tokens) in "
                f"{time.perf_counter() - started:.0f} s")
        engine.close()
        worker = h.start_worker(env)
        options = [part for name, value in policy.items() for part in (f"--{name}", value)]
        say(f"$ segue migrate start --to {CHUNKED} --source <all-MiniLM-L6-v2> {' '.join(options)}")
        say(run_segue("migrate", "start", "--to", CHUNKED, "--source", str(minilm_path()), *options,
                      env=env).stdout.strip())
        started = time.perf_counter()
        run_segue("backfill", "--wait", env=env, timeout=7200)
        took = time.perf_counter() - started
        chunked = registry_spec(h, CHUNKED)
        chunks, tokens = h.sql(sql.SQL("SELECT count(*), sum(tokens) FROM {}").format(
            model_columns.chunk_table(chunked.version)))[0]
        say(f"backfill of {len(corpus)} documents: {took:.0f} s, {len(corpus) / took:.1f} documents/s, "
            f"{chunks / took:.1f} chunks/s; {chunks} chunks ({chunks / len(corpus):.2f} a document), "
            f"{tokens} tokens ({tokens / chunks:.0f} a chunk)")
        evaluation = run_segue("eval", "--scifact", env=env, timeout=3600).stdout.strip()
        say(evaluation)
        old, new, verdict = h.sql("SELECT old_value, new_value, verdict FROM model_evaluations ORDER BY id DESC"
                                  " LIMIT 1")[0]
        cutover = run_segue("migrate", "cutover", env=env, check=False)
        say(f"$ segue migrate cutover → exit {cutover.returncode}: {(cutover.stdout + cutover.stderr).strip()}")
        edit = edit_one_paragraph(h, chunked, corpus, say)
        stored = storage(h, chunked, len(corpus), say)
        h.stop_worker(worker)
        rates = write_rates(h, say=say)
        return ChunkingResult(len(corpus), chunks, took, old, new, verdict, evaluation, cutover.returncode, edit,
                              stored, rates)
    finally:
        h.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=None, help="only the first N abstracts")
    for name, default in POLICY.items():
        parser.add_argument(f"--{name}", default=default)
    args = parser.parse_args()
    result = measure(args.docs, {name: getattr(args, name.replace("-", "_")) for name in POLICY})
    print(result.describe())


def registry_spec(h: Harness, name: str):
    with connections.connect(h.settings, h.database_url) as conn:
        return registry.get_model(conn, name).spec


def edit_one_paragraph(h: Harness, spec, corpus, say=print) -> tuple[int, int]:
    """A document of SciFact abstracts as paragraphs, 20 chunks or more; then one word of one paragraph changed."""
    paragraphs = [d.text.split("\n\n", 1)[-1] for d in corpus[:40]]
    for count in range(4, 41):
        body = "Twenty chunks of abstracts\n\n" + "\n\n".join(paragraphs[:count])
        h.publish_changes([("long-doc", change("long-doc", body, count))])
        wait_for(lambda c=count: h.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = 'long-doc'"
                                          " AND doc_version = %s AND model_version = %s", (c, spec.version)),
                 timeout=600, what="the long document embedded")
        held = h.scalar(sql.SQL("SELECT count(*) FROM {} WHERE doc_id = 'long-doc'").format(
            model_columns.chunk_table(spec.version)))
        if held >= 20:
            break
    middle = count // 2
    edited = paragraphs[:count]
    edited[middle] = re.sub(r"\b(\w{5,})\b", "modified", edited[middle], count=1)
    version = count + 100
    h.publish_changes([("long-doc", change("long-doc", "Twenty chunks of abstracts\n\n" + "\n\n".join(edited),
                                           version))])
    detail = wait_for(lambda: h.scalar("SELECT detail FROM migration_changelog WHERE doc_id = 'long-doc'"
                                       " AND doc_version = %s AND model_version = %s AND action = 'embedded'",
                                       (version, spec.version)), timeout=600, what="the edit embedded")
    say(f"edit of one word in paragraph {middle} of {count} (a {held}-chunk document): "
        f"{detail['chunks_embedded']} of {detail['chunks']} chunks re-embedded")
    return detail["chunks_embedded"], detail["chunks"]


def storage(h: Harness, spec, documents: int, say=print) -> tuple[float, float]:
    with connections.connect(h.settings, h.database_url) as conn:
        model_columns.create_index(conn, spec.version, m=16, ef_construction=64, memory_mb=512)
        table, index, rows = conn.execute(
            "SELECT pg_table_size(c.oid), pg_indexes_size(c.oid), c.reltuples FROM pg_class c WHERE relname = %s",
            (f"chunks_v{spec.version}",)).fetchone()
        truncated = registry.get_model(conn, TRUNCATED).spec
        column = conn.execute(sql.SQL("SELECT sum(pg_column_size({})) FROM documents").format(
            model_columns.vector_column(truncated.version))).fetchone()[0]
    say(f"storage: one vector a document {column / 2**20:.1f} MiB ({column / documents:.0f} B a document); "
        f"chunk table {table / 2**20:.1f} MiB + {index / 2**20:.1f} MiB of indexes "
        f"({(table + index) / documents:.0f} B a document, {(table + index) / column:.1f}×)")
    return column / documents, (table + index) / documents


def write_rates(h: Harness, documents: int = 5000, chunks: int = 5, dim: int = 384,
                say=print) -> tuple[float, float]:
    """Documents written through Store.upsert_documents: one vector each, then one vector and ``chunks`` chunks."""
    with connections.connect(h.settings, h.database_url) as conn:
        whole = registry.register_model(conn, "write-whole", "bench", profile=ModelProfile(
            provider="adopted", dim=dim, max_tokens=0, config={}, fingerprint="write-whole"))
        cut = registry.register_model(conn, "write-chunked", "bench", profile=ModelProfile(
            provider="adopted", dim=dim, max_tokens=0, config={"chunking": "adopted"}, fingerprint="write-chunked"))
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((documents * chunks, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    source = SourcePosition("bench", 0, 0)

    def rows(prefix: str, spec, with_chunks: bool) -> list[DocumentRow]:
        out = []
        for n in range(documents):
            vectors = unit[n * chunks:(n + 1) * chunks]
            pieces = [ChunkRow(c, c * 100, c * 100 + 99, 64, bytes([c]) * 32, vectors[c]) for c in range(chunks)]
            out.append(DocumentRow(f"{prefix}-{n:06d}", "x" * 500, 1, bytes(32), {}, source,
                                   vectors={spec.version: vectors.mean(axis=0)},
                                   chunks={spec.version: pieces} if with_chunks else {}))
        return out

    async def write(batch: list[DocumentRow], spec) -> float:
        store = Store(h.settings, h.database_url)
        started = time.perf_counter()
        for i in range(0, len(batch), 256):
            async with store.transaction() as tx:
                await tx.upsert_documents(batch[i:i + 256], [spec])
        await store.close()
        return time.perf_counter() - started

    rates = []
    for label, spec, with_chunks in (("one vector a document", whole, False),
                                     (f"{chunks} chunks a document", cut, True)):
        rates.append(documents / asyncio.run(write(rows(label.split()[0], spec, with_chunks), spec)))
        say(f"write rate, {label} ({dim}-d, batches of 256, no index): {rates[-1]:,.0f} documents/s"
            + (f", {rates[-1] * chunks:,.0f} chunk rows/s" if with_chunks else ""))
    return rates[0], rates[1]


if __name__ == "__main__":
    sys.exit(main())
