"""Cold start: worker launch → ready (models warm, partitions assigned), against loading the models bare.

    python benchmarks/bench_cold_start.py [--runs 3]

Embedded services of its own with a static model and MiniLM registered. Each run times
``segue worker`` from launch to its first 200 on ``/readyz``, and a bare process that only
imports the engine, loads both models and embeds one text with each (the floor a worker
cannot beat). Prints the median of each and their ratio.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from benchmarks.common import static_model  # noqa: E402
from segue import registry  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402
from segue.spec import ModelSpec  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    worker, bare = measure(args.runs)
    print(f"static-256 + MiniLM, median of {args.runs}: worker launch → ready {worker:.2f} s, "
          f"bare import + load + warm {bare:.2f} s, ratio {worker / bare:.2f}")


if __name__ == "__main__":
    main()
