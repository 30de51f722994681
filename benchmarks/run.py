"""Every performance goal of Segue measured side by side in one run: the README's benchmark table.

    python benchmarks/run.py [--only NAME[,NAME]]

Runs each benchmark of this folder at the size its goal names, one after the other on
this machine, and prints one Markdown table: the measure, its goal, the figure, and
whether the goal is met. The GPU rows run where CUDA is present and say so where not.
Nothing here asserts; a missed goal is a row to read, not a failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks import tests.harness

import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    bench_cold_start,
    bench_engine,
    bench_pipeline,
    bench_progress,
    bench_read_miss,
)
from segue.devtools.corpus import scifact_documents  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    measure: str
    goal: str
    figure: str
    met: bool | None  # None: not run here

    def markdown(self) -> str:
        verdict = {True: "met", False: "not met", None: "not run"}[self.met]
        return f"| {self.measure} | {self.goal} | {self.figure} | {verdict} |"


def gpu_model(args: argparse.Namespace, name: str) -> Path | None:
    """The GPU rows' model ``name`` (``minilm`` or ``bert-base``) from ``--models``, with random weights of
    its config's shape where the folder has none; MiniLM from the ``demo`` extra without ``--models``."""
    if args.models is None:
        return minilm_path() if name == "minilm" else None
    folder = args.models / name
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return folder
    return bench_engine.random_weights_copy(folder)


def gpu_encode(args: argparse.Namespace) -> Iterator[Row]:
    measure, goal = f"GPU raw encode, MiniLM fp16, SciFact abstracts ×{args.gpu_repeat}", "≥ 20,000 docs/s"
    if not torch.cuda.is_available():
        yield Row(measure, goal, "no CUDA device on this machine", None)
        return
    texts = [doc.text for doc in scifact_documents()] * args.gpu_repeat
    result = bench_engine.gpu_encode(gpu_model(args, "minilm"), texts, reference_texts=5183, batch_sizes=[256, 1024])
    caps = ", ".join(f"{cap}: {rate:,.0f}" for cap, rate in result.by_batch_size.items())
    yield Row(f"{measure} ({torch.cuda.get_device_name(0)})", goal,
              f"{result.engine_per_s:,.0f} docs/s, MFU {result.mfu:.1%} ({result.tflops:.0f} of "
              f"{result.peak_tflops:.0f} TFLOP/s measured fp16); sentence-transformers {result.reference_per_s:,.0f};"
              f" min cos {result.min_cosine:.4f}; docs/s by batch cap {caps}", result.engine_per_s >= 20_000)


def gpu_pipeline(args: argparse.Namespace) -> Iterator[Row]:
    measure, goal = "GPU end to end, MiniLM + BERT-base fp16, ÷ raw encode of both", "≥ 0.8"
    if not torch.cuda.is_available():
        yield Row(measure, goal, "no CUDA device on this machine", None)
        return
    minilm, bert = gpu_model(args, "minilm"), gpu_model(args, "bert-base")
    if bert is None:
        yield Row(measure, goal, "needs --models with bert-base", None)
        return
    fp16 = {"dtype": "float16"}
    full = bench_pipeline.end_to_end(5183, [("minilm", str(minilm), fp16), ("bert-base", str(bert), fp16)],
                                     repeat=args.gpu_repeat)
    ratio = full.events_per_s / full.raw_per_s
    yield Row(f"{measure}, {5183 * args.gpu_repeat:,} abstracts", goal,
              f"{ratio:.3f} ({full.events_per_s:,.0f} vs {full.raw_per_s:,.0f} docs/s)", ratio >= 0.8)


def cpu_engine(args: argparse.Namespace) -> Iterator[Row]:
    texts = [doc.text for doc in scifact_documents(300)]
    versus = bench_engine.engine_vs_reference(texts)
    ratio = versus.engine_per_s / versus.reference_per_s
    yield Row(f"{versus.device.upper()}, engine ÷ `SentenceTransformer.encode`, 300 abstracts", "≥ 1.3×",
              f"{ratio:.2f}× ({versus.engine_per_s:.1f} vs {versus.reference_per_s:.1f} docs/s, "
              f"min cos {versus.min_cosine:.6f}); the engine sustains {versus.gflops:,.0f} GFLOP/s, "
              f"{versus.gflops / versus.peak_gflops:.0%} of a {versus.peak_gflops:,.0f} GFLOP/s matrix product",
              ratio >= 1.3 and versus.min_cosine >= 0.999)


def pipeline(args: argparse.Namespace) -> Iterator[Row]:
    full = bench_pipeline.end_to_end(300)
    ratio = full.events_per_s / full.raw_per_s
    yield Row("End to end (static + MiniLM) ÷ raw encode of both, 300 abstracts", "≥ 0.9",
              f"{ratio:.3f} ({full.events_per_s:.2f} vs {full.raw_per_s:.2f} docs/s)", ratio >= 0.9)
    lean = bench_pipeline.non_model_path(20_000)
    yield Row("Non-model path: two static models, 20,000 short upserts, one worker", "≥ 5,000 events/s",
              f"{lean.events_per_s:,.0f} events/s", lean.events_per_s >= 5_000)


def read_misses(args: argparse.Namespace) -> Iterator[Row]:
    goals = {"idle": 250, "changes": 500, "backfill": 500}
    names = {"idle": "Read miss → vector committed, MiniLM, idle worker",
             "changes": "Read miss while 2,000 changes are queued",
             "backfill": "Read miss while a 2,000-document backfill is queued"}
    for result in bench_read_miss.measure(misses=200, rate=5, queued=2000, loads=list(goals), fetch_waits=[]):
        left = f", {result.queued_left:,} queued left" if result.load != "idle" else ""
        yield Row(f"{names[result.load]} (200 at 5/s)", f"p99 ≤ {goals[result.load]} ms",
                  f"p50 {result.p50:,.0f} ms, p99 {result.p99:,.0f} ms{left}", result.p99 <= goals[result.load])


def cold_start(args: argparse.Namespace) -> Iterator[Row]:
    worker, bare = bench_cold_start.measure(3)
    yield Row("Worker start → ready (static + MiniLM) ÷ bare import + load + warm", "≤ 1.2",
              f"{worker / bare:.2f} ({worker:.1f} s vs {bare:.1f} s)", worker / bare <= 1.2)


def progress(args: argparse.Namespace) -> Iterator[Row]:
    timing = bench_progress.measure(1_000_000)
    yield Row("`migration_progress` at 1M documents", "≤ 100 ms, exact",
              f"median {timing.median_ms:.2f} ms, max {timing.max_ms:.2f} ms, exact: {timing.exact}",
              timing.max_ms <= 100 and timing.exact)


BENCHMARKS: dict[str, Callable[[argparse.Namespace], Iterator[Row]]] = {
    "gpu": gpu_encode, "gpu-pipeline": gpu_pipeline, "engine": cpu_engine, "pipeline": pipeline, "read-misses": read_misses,
    "cold-start": cold_start, "progress": progress,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"some of {', '.join(BENCHMARKS)}")
    parser.add_argument("--models", type=Path, help="folders minilm and bert-base for the GPU rows (sentence-"
                        "transformers layout); one without weights gets random weights of its config's shape")
    parser.add_argument("--gpu-repeat", type=int, default=20, help="the GPU rows embed SciFact this many times over")
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    started = time.perf_counter()
    rows = []
    for name in chosen:
        for row in BENCHMARKS[name](args):
            print(row.markdown(), flush=True)  # as it comes: the whole run takes a while
            rows.append(row)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s")
    print("| measure | goal | figure | verdict |\n|---|---|---|---|")
    print("\n".join(row.markdown() for row in rows))


if __name__ == "__main__":
    main()
