"""Cold start: worker launch → ready (models warm, partitions assigned), against loading the models bare; and a
reader's first search on a migration's new model, against its steady searches.

    python benchmarks/bench_cold_start.py [--runs 3] [--readers 5]

Embedded services of its own with a static model and MiniLM registered. Each run times
``segue worker`` from launch to its first 200 on ``/readyz``, and a bare process that only
imports the engine, loads both models and embeds one text with each (the floor a worker
cannot beat). Prints the median of each and their ratio.

Then, with the static model serving 2,000 documents, each of ``--readers`` fresh readers (serving
TTL 2 s, the default) searches 20 times a second; ``migrate start`` to a new MiniLM registration;
the reader keeps searching, and 4 s after the start (its view refresh, plus time to warm the
model) makes its first search on the new model (``parallel``: both models embed the query), then
30 more; the migration is aborted. Prints the p99 of the first searches on the new model against
the p99 of those that followed, and the slowest read-model search while the new model warmed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from benchmarks.common import static_model  # noqa: E402
from segue.client.reader import SegueReader  # noqa: E402
from segue.control import migration, registry  # noqa: E402
from segue.devtools.corpus import scifact_queries_list  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402
from segue.embedding import providers  # noqa: E402
from segue.spec import ModelSpec  # noqa: E402
from segue.storage import documents  # noqa: E402
from tests.harness import Harness, free_port, wait_for  # noqa: E402

BARE = """
import json, sys
from segue.embedding.engine import EmbeddingEngine
from segue.spec import ModelSpec
engine = EmbeddingEngine()
for row in json.load(sys.stdin):
    engine.embed_sync(ModelSpec(**row), ["warm up"])
engine.close()
"""


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def worker_seconds(h: Harness) -> float:
    """Seconds from launching a worker to its first ready answer."""
    port = free_port()
    started = time.perf_counter()
    worker = h.start_worker(h.env | {"SEGUE_METRICS_PORT": str(port)})
    try:
        wait_for(lambda: ready(f"http://127.0.0.1:{port}/readyz"), timeout=300, interval=0.05, what="the worker ready")
        return time.perf_counter() - started
    finally:
        h.stop_worker(worker)


def bare_seconds(specs: list[ModelSpec]) -> float:
    """Seconds for a fresh interpreter to import the engine, load the models and embed one text with each."""
    rows = json.dumps([dataclasses.asdict(spec) for spec in specs])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE], input=rows, text=True, check=True, capture_output=True)
    return time.perf_counter() - started


def measure(runs: int) -> tuple[float, float]:
    """Median worker-ready and bare-load seconds over ``runs`` launches each."""
    h = Harness(Path(tempfile.mkdtemp(prefix="segue-bench-cold-start-")))
    try:
        specs = [registry.register_model(h.conn, "static", str(static_model(256))),
                 registry.register_model(h.conn, "minilm", str(minilm_path()))]
        bare_seconds(specs)  # the first run fills the page cache for both
        workers = [worker_seconds(h) for _ in range(runs)]
        bares = [bare_seconds(specs) for _ in range(runs)]
        return statistics.median(workers), statistics.median(bares)
    finally:
        h.close()


SERVING_TTL_S = 2.0  # the reader's default
SEARCH_INTERVAL_S = 0.05  # a reader's steady traffic: 20 searches a second
FIRST_SEARCH_AFTER_S = 4.0  # from migrate start to the reader's first search on the new model
STEADY_SEARCHES = 30  # on the new model, after the first
CORPUS_SIZE = 2000


@dataclass(frozen=True)
class AfterStart:
    """Search latencies of readers across ``migrate start``, in milliseconds."""

    first_ms: list[float]  # each reader's first search on the new model
    steady_ms: list[float]  # the searches on the new model that followed it
    warming_ms: list[float]  # the read-model searches between the start and the first search on the new model


def measure_after_start(readers: int) -> AfterStart:
    """Search latencies of ``readers`` fresh readers, each across its own ``migrate start`` from a static model to
    a new MiniLM registration (aborted afterwards)."""
    h = Harness(Path(tempfile.mkdtemp(prefix="segue-bench-after-start-")))
    try:
        static = registry.register_model(h.conn, "static", str(static_model(256)))
        vectors = np.random.default_rng(0).normal(size=(CORPUS_SIZE, static.dim)).astype(np.float32)
        documents.insert_embedded(h.conn, [(f"doc-{n:05d}", f"document {n}") for n in range(CORPUS_SIZE)],
                                  {static.version: vectors / np.linalg.norm(vectors, axis=1, keepdims=True)})
        minilm = providers.inspect(str(minilm_path()))  # profiled once, registered afresh for each migration
        queries = scifact_queries_list(300)
        figures = AfterStart([], [], [])
        for run in range(readers):
            registry.register_model(h.conn, f"minilm-{run}", str(minilm_path()), profile=minilm)
            _search_across_start(h, f"minilm-{run}", queries, figures)
        return figures
    finally:
        h.close()


def _search_across_start(h: Harness, new_model: str, queries: list[str], figures: AfterStart) -> None:
    """One fresh reader's searches before and after ``migrate start`` to ``new_model``, added to ``figures``."""
    asked = iter(queries * 2)
    with SegueReader(h.settings, database_url=h.database_url, serving_ttl_s=SERVING_TTL_S, read_miss_rate=0) as reader:

        def timed(mode: str) -> float:
            """Milliseconds one search in ``mode`` took; then the pause of steady traffic."""
            started = time.perf_counter()
            reader.search(next(asked), k=10, mode=mode)
            took = (time.perf_counter() - started) * 1000
            time.sleep(SEARCH_INTERVAL_S)
            return took

        for _ in range(20):  # a second of steady traffic on the read model
            timed("incremental")
        migration.start(h.conn, new_model, cutover_min_coverage_pct=100.0)
        started = time.monotonic()
        while time.monotonic() - started < FIRST_SEARCH_AFTER_S:
            figures.warming_ms.append(timed("incremental"))
        figures.first_ms.append(timed("parallel"))
        figures.steady_ms.extend(timed("parallel") for _ in range(STEADY_SEARCHES))
    migration.abort(h.conn)


def first_search_after_start(readers: int) -> tuple[float, float]:
    """p99 of ``readers`` fresh readers' first search on a migration's new model 4 s after ``migrate start``, and
    p99 of their searches on it that followed, in milliseconds."""
    figures = measure_after_start(readers)
    return _p99(figures.first_ms), _p99(figures.steady_ms)


def _p99(milliseconds: list[float]) -> float:
    return float(np.percentile(milliseconds, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readers", type=int, default=5)
    args = parser.parse_args()
    worker, bare = measure(args.runs)
    print(f"static-256 + MiniLM, median of {args.runs}: worker launch → ready {worker:.2f} s, "
          f"bare import + load + warm {bare:.2f} s, ratio {worker / bare:.2f}")
    after = measure_after_start(args.readers)
    print(f"static-256 → MiniLM, {args.readers} fresh readers: first search after migrate start "
          f"p99 {_p99(after.first_ms):.1f} ms vs steady p99 {_p99(after.steady_ms):.1f} ms "
          f"(p50 {np.percentile(after.first_ms, 50):.1f} ms vs {np.percentile(after.steady_ms, 50):.1f} ms); "
          f"read-model searches while it warmed: p99 {_p99(after.warming_ms):.1f} ms, "
          f"max {max(after.warming_ms):.1f} ms")


if __name__ == "__main__":
    main()
