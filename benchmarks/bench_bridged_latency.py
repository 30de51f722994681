"""What bridged reads add to a query's latency, at 100,000 documents with HNSW indexes on both columns.

    python benchmarks/bench_bridged_latency.py                 # 100,000 documents, half embedded by the new model
    python benchmarks/bench_bridged_latency.py --docs 20000

Synthetic vectors (latency does not depend on what they mean): an old 256-d and a new 384-d
column, the new model current on half the documents, an HNSW index on each. Queries go through
the real reader, with the query vectors given (so no model runs): one column alone
(``search_vector``), ``incremental`` reading the new model as today (its column, plus the old
column for the documents it lacks, merged by reciprocal rank fusion), and ``bridged`` (its
column, plus the old column searched with the query carried by the adapter, calibrated per
query). Prints p50 / p99 of each, and bridged minus incremental. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import tempfile
import time
from pathlib import Path

import numpy as np
from psycopg import sql

from segue.client.reader import SegueReader
from segue.client.search import QueryVector
from segue.control import bridging, migration, registry
from segue.devtools import services
from segue.embedding.providers import ADOPTED
from segue.settings import Settings
from segue.spec import ModelProfile
from segue.storage import connections, documents, model_columns, upgrades

QUERIES = 500
OLD_DIM, NEW_DIM = 256, 384


def unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)).astype(np.float32)


def percentiles(seconds: list[float]) -> str:
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return f"p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100_000)
    args = parser.parse_args()
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="segue-bench-latency-")), embedded_kafka_port=29094,
                        adapter_min_retention=0.0)
    url = services.database_url(settings)
    atexit.register(services.down, settings)  # the embedded services this run started end with it
    upgrades.upgrade(settings, url)
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(200, NEW_DIM))
    new_vectors = unit(topics[rng.integers(0, 200, args.docs)] + 0.5 * rng.normal(size=(args.docs, NEW_DIM)))
    projection = np.linalg.qr(rng.normal(size=(NEW_DIM, NEW_DIM)))[0][:, :OLD_DIM]
    old_vectors = unit(new_vectors @ projection + 0.05 * rng.normal(size=(args.docs, OLD_DIM)))
    with connections.connect(settings, url) as conn:
        old = registry.register_model(conn, "old", "synthetic-old", profile=synthetic(OLD_DIM, "old"))
        new = registry.register_model(conn, "new", "synthetic-new", profile=synthetic(NEW_DIM, "new"))
        started = time.perf_counter()
        ids = [f"doc-{n:07d}" for n in range(args.docs)]
        documents.insert_embedded(conn, [(doc_id, doc_id) for doc_id in ids],
                                  {old.version: old_vectors, new.version: new_vectors})
        conn.execute(sql.SQL("UPDATE documents SET {h} = NULL WHERE doc_id > %s").format(
            h=model_columns.sha_column(new.version)), (ids[args.docs // 2],))
        print(f"{args.docs} documents written in {time.perf_counter() - started:.0f} s")
        for spec in (old, new):
            started = time.perf_counter()
            model_columns.create_index(conn, spec.version, m=16, ef_construction=64, memory_mb=512)
            print(f"HNSW index on {spec.name} ({spec.dim}-d) built in {time.perf_counter() - started:.0f} s")
        conn.execute("ANALYZE documents")
        migration.start(conn, "new", cutover_min_coverage_pct=100.0)
    queries = unit(topics[rng.integers(0, 200, QUERIES)] + 0.5 * rng.normal(size=(QUERIES, NEW_DIM)))
    given = [{"new": QueryVector(q, new.fingerprint), "old": QueryVector(unit(q @ projection), old.fingerprint)}
             for q in queries]

    def timed(run) -> list[float]:
        run(0)  # warm the pool and the view
        seconds = []
        for n in range(QUERIES):
            started = time.perf_counter()
            run(n)
            seconds.append(time.perf_counter() - started)
        return seconds

    with SegueReader(settings, database_url=url, read_model="new", read_miss_rate=0) as reader:
        alone = timed(lambda n: reader.search_vector(queries[n], "new", fingerprint=new.fingerprint, k=10))
        incremental = timed(lambda n: reader.search("", k=10, mode="incremental", vectors=given[n]))
        with connections.connect(settings, url) as conn:
            fit = bridging.fit(conn, settings)
        print(f"adapter fitted on {fit.fitted.pairs} pairs in its own step; held-out retention {fit.fitted.retention:.3f}")
        time.sleep(2.1)  # the reader's view (serving_ttl_s) picks the adapter up
        bridged = timed(lambda n: reader.search("", k=10, mode="bridged", vectors=given[n]))
        assert reader.search("", k=10, mode="bridged", vectors=given[0]).mode == "bridged"
    print(f"one column (search_vector)   {percentiles(alone)}")
    print(f"incremental (two columns)    {percentiles(incremental)}")
    print(f"bridged (two columns)        {percentiles(bridged)}")
    added = np.percentile(np.array(bridged) * 1000, [50, 99]) - np.percentile(np.array(incremental) * 1000, [50, 99])
    print(f"bridged − incremental: p50 {added[0]:+.2f} ms, p99 {added[1]:+.2f} ms "
          "(incremental also embeds the query with the old model, not counted here)")


def synthetic(dim: int, name: str) -> ModelProfile:
    """A profile for vectors made here: a model Segue never runs."""
    return ModelProfile(provider=ADOPTED, dim=dim, max_tokens=512, config={}, fingerprint=f"synthetic-{name}-{dim}")


if __name__ == "__main__":
    main()
