"""Benchmark: one abstract's forward pass alone and beside a thread running Python, by GIL switch interval.

A worker's event loop (Faust, the store) runs Python while the engine thread runs a model,
whose every operator takes the GIL back, each time waiting up to the running thread's switch
interval. This prints the median and the slowest of ``--passes`` one-abstract passes of
MiniLM (the engine, in this thread), alone and while another thread loops in Python, for each
of ``--intervals`` (CPython's default is 5 ms).

    PYTHONPATH=. python benchmarks/bench_engine_beside_python.py [--passes 40] [--intervals 5,0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from segue.devtools.corpus import scifact_documents
from segue.devtools.modelkit import minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.embedding.providers import inspect
from segue.spec import ModelSpec


def pass_times_ms(engine: EmbeddingEngine, spec: ModelSpec, texts: list[str]) -> list[float]:
    """Milliseconds of each one-text pass."""
    times = []
    for text in texts:
        started = time.perf_counter()
        engine.embed_sync(spec, [text])
        times.append((time.perf_counter() - started) * 1000)
    return times


def beside_python(engine: EmbeddingEngine, spec: ModelSpec, texts: list[str]) -> list[float]:
    """:func:`pass_times_ms` while another thread loops in pure Python."""
    stop = threading.Event()

    def loop() -> None:
        total = 0
        while not stop.is_set():
            total += sum(i * i for i in range(1000))

    busy = threading.Thread(target=loop, name="busy-python")
    busy.start()
    try:
        return pass_times_ms(engine, spec, texts)
    finally:
        stop.set()
        busy.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--intervals", default="5,0.5", help="GIL switch intervals to compare, in ms")
    args = parser.parse_args()
    source = str(minilm_path())
    spec = ModelSpec.from_profile(1, "minilm", source, inspect(source))
    texts = [doc.text for doc in scifact_documents(args.passes)]
    engine = EmbeddingEngine()
    try:
        engine.embed_sync(spec, texts[:8])
        print(f"MiniLM, one SciFact abstract a pass, {args.passes} passes")
        print(f"{'switch interval':<18} {'alone p50':>10} {'alone max':>10} {'beside p50':>11} {'beside max':>11}")
        for interval in (float(ms) / 1000 for ms in args.intervals.split(",")):
            sys.setswitchinterval(interval)
            alone, beside = pass_times_ms(engine, spec, texts), beside_python(engine, spec, texts)
            print(f"{interval * 1000:>15.1f} ms {statistics.median(alone):>8.0f} ms {max(alone):>7.0f} ms"
                  f" {statistics.median(beside):>8.0f} ms {max(beside):>8.0f} ms")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
