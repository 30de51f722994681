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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    bench_chunking,
    bench_cold_start,
    bench_engine,
    bench_import_chunks,
    bench_pipeline,
    bench_progress,
    bench_read_miss,
    bench_write_ceiling,
)
from benchmarks.common import describe_cores  # noqa: E402
from benchmarks.mpnet import mpnet_path  # noqa: E402
from segue.devtools.corpus import scifact_documents  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    measure: str
    goal: str
    figure: str
    met: bool | None  # None: a figure with no goal to meet (printed), or not run
    ran: bool = True

    def markdown(self) -> str:
        verdict = {True: "met", False: "not met", None: "printed"}[self.met] if self.ran else "not run"
        return f"| {self.measure} | {self.goal} | {self.figure} | {verdict} |"


def gpu_model(args: argparse.Namespace, name: str) -> tuple[Path, str]:
    """The GPU rows' model ``name`` (``minilm`` or ``mpnet``) and how it is labelled: from ``--models`` (random
    weights of its config's shape where the folder has none, as benchmarks/gpu/prepare.py leaves them), else
    the trained one on this machine (MiniLM from the ``demo`` extra; mpnet fetched by benchmarks/mpnet.py)."""
    if args.models is None:
        return (minilm_path() if name == "minilm" else mpnet_path()), name
    folder = args.models / name
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return folder, name
    return bench_engine.random_weights_copy(folder), f"{name} (random weights of its shape)"


def gpu_encode(args: argparse.Namespace) -> Iterator[Row]:
    measure, goal = f"GPU raw encode, MiniLM fp16, SciFact abstracts ×{args.gpu_repeat}", "≥ 30,000 docs/s"
    if not torch.cuda.is_available():
        yield Row(measure, goal, "no CUDA device on this machine", None, ran=False)
        return
    texts = [doc.text for doc in scifact_documents()] * args.gpu_repeat
    minilm, _ = gpu_model(args, "minilm")
    result = bench_engine.gpu_encode(minilm, texts, reference_texts=5183, batch_sizes=[256, 1024])
    caps = ", ".join(f"{cap}: {rate:,.0f}" for cap, rate in result.by_batch_size.items())
    yield Row(f"{measure} ({torch.cuda.get_device_name(0)})", goal,
              f"{result.engine_per_s:,.0f} docs/s, MFU {result.mfu:.1%} ({result.tflops:.0f} of "
              f"{result.peak_tflops:.0f} TFLOP/s measured fp16); sentence-transformers {result.reference_per_s:,.0f};"
              f" min cos {result.min_cosine:.4f}; docs/s by batch cap {caps}", result.engine_per_s >= 30_000)


def gpu_pipeline(args: argparse.Namespace) -> Iterator[Row]:
    processes = args.gpu_processes
    both = f"GPU end to end, Kafka → MiniLM + mpnet fp16 → PostgreSQL, {processes} worker processes, ÷ raw encode of both"
    alone = f"GPU end to end, MiniLM alone, one host, {processes} worker processes"
    if not torch.cuda.is_available():
        yield Row(both, "≥ 0.8", "no CUDA device on this machine", None, ran=False)
        yield Row(alone, "≥ 20,000 docs/s", "no CUDA device on this machine", None, ran=False)
        return
    fp16 = {"dtype": "float16"}
    (minilm, _), (mpnet, mpnet_label) = gpu_model(args, "minilm"), gpu_model(args, "mpnet")
    texts = f"{5183 * args.gpu_repeat:,} abstracts"
    full = bench_pipeline.end_to_end(5183, [("minilm", str(minilm), fp16), ("mpnet", str(mpnet), fp16)],
                                     repeat=args.gpu_repeat, processes=processes)
    ratio = full.events_per_s / full.raw_per_s
    yield Row(f"{both}, {texts}, {mpnet_label}", "≥ 0.8", f"{ratio:.3f} ({full.events_per_s:,.0f} vs "
              f"{full.raw_per_s:,.0f} docs/s); {describe_cores(full.cores)}", ratio >= 0.8)
    single = bench_pipeline.end_to_end(5183, [("minilm", str(minilm), fp16)], repeat=args.gpu_repeat,
                                       processes=processes)
    yield Row(f"{alone}, {texts}", "≥ 20,000 docs/s", f"{single.events_per_s:,.0f} docs/s (raw encode "
              f"{single.raw_per_s:,.0f}); {describe_cores(single.cores)}", single.events_per_s >= 20_000)


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
    yield Row("CPU end to end (static + MiniLM) ÷ raw encode of both, 300 abstracts", "≥ 0.95",
              f"{ratio:.3f} ({full.events_per_s:.2f} vs {full.raw_per_s:.2f} docs/s)", ratio >= 0.95)
    lean = bench_pipeline.non_model_path(20_000, processes=(1, 2))
    one, two = lean[1], lean[2]
    yield Row("Non-model path: two static models, 20,000 short upserts, one worker process", "≥ 3,000 events/s",
              f"{one.events_per_s:,.0f} events/s; {describe_cores(one.cores)}", one.events_per_s >= 3_000)
    scale = two.events_per_s / one.events_per_s
    yield Row("Non-model path: two worker processes ÷ one, same run", "≥ 1.6×",
              f"{scale:.2f}× ({two.events_per_s:,.0f} events/s; {describe_cores(two.cores)})", scale >= 1.6)


def write_ceiling(args: argparse.Namespace) -> Iterator[Row]:
    for row in bench_write_ceiling.measure(10_000, (1, 2, 4)):
        hot = f", {row.hot_share:.1%} HOT" if row.kind == "backfill" else ""
        yield Row(f"PostgreSQL write ceiling, {row.configuration}, 10,000 documents into 100,000", "printed",
                  f"{row.rows_per_s:,.0f} rows/s, {row.wal_mib_per_s:,.1f} MiB/s WAL ({row.wal_kib_per_row:.1f} KiB "
                  f"a row{hot}); {row.busiest_states()}", None)


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
    after = bench_cold_start.measure_after_start(5)
    first, steady = (float(np.percentile(after.first_ms, 99)), float(np.percentile(after.steady_ms, 99)))
    yield Row("A reader's first search on the new model 4 s after `migrate start` (static → MiniLM, 5 fresh "
              "readers), p99", "≤ its steady p99 + 50 ms",
              f"{first:.1f} ms vs steady {steady:.1f} ms; its searches on the old model meanwhile: max "
              f"{max(after.warming_ms):.1f} ms", first <= steady + 50)


def progress(args: argparse.Namespace) -> Iterator[Row]:
    timing = bench_progress.measure(1_000_000)
    yield Row("`migration_progress` at 1M documents", "≤ 100 ms, exact",
              f"median {timing.median_ms:.2f} ms, max {timing.max_ms:.2f} ms, exact: {timing.exact}",
              timing.max_ms <= 100 and timing.exact)


def chunking(args: argparse.Namespace) -> Iterator[Row]:
    run = bench_chunking.measure(say=lambda line: None)
    policy = ", ".join(f"{name} {value}" for name, value in bench_chunking.POLICY.items())
    yield Row(f"SciFact nDCG@10, all-MiniLM-L6-v2 truncated at 256 tokens vs chunked ({policy}), best chunk",
              "printed, with `segue eval`'s verdict", run.describe(), None)
    yield Row("A migration from the truncated model to the chunked one through the CLI", "works end to end, gate "
              "included", f"backfill of {run.documents:,} documents ({run.chunks:,} chunks) in {run.backfill_s:.0f} s, "
              f"eval {run.verdict}, `migrate cutover` exit {run.cutover_exit}",
              run.verdict == "pass" and run.cutover_exit == 0)
    embedded, held = run.edit
    yield Row("Edit one paragraph of a 20-chunk document", "only the touched chunks re-embedded",
              f"{embedded} of {held} chunks", embedded <= 2)
    whole, chunked = run.bytes_a_document
    one, five = run.documents_per_s
    yield Row("Chunk-table storage and write rate vs one vector a document (384-d, 5 chunks a document, no index)",
              "printed", f"{chunked:,.0f} vs {whole:,.0f} bytes a document ({chunked / whole:.1f}×); "
              f"{five:,.0f} documents/s ({5 * five:,.0f} chunk rows/s) vs {one:,.0f}", None)


def import_chunks(args: argparse.Namespace) -> Iterator[Row]:
    rates = bench_import_chunks.measure(say=lambda line: None)
    yield Row(f"`segue import` of a {rates.rows:,}-row chunk table, 384-d", "≥ 20,000 rows/s",
              f"{rates.first:,.0f} rows/s; again with nothing newer {rates.again:,.0f}", rates.first >= 20_000)


BENCHMARKS: dict[str, Callable[[argparse.Namespace], Iterator[Row]]] = {
    "gpu": gpu_encode, "gpu-pipeline": gpu_pipeline, "engine": cpu_engine, "pipeline": pipeline,
    "write-ceiling": write_ceiling, "read-misses": read_misses, "cold-start": cold_start, "progress": progress,
    "chunking": chunking, "import-chunks": import_chunks,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"some of {', '.join(BENCHMARKS)}")
    parser.add_argument("--models", type=Path, help="folders minilm and mpnet for the GPU rows (sentence-"
                        "transformers layout); one without weights gets random weights of its config's shape")
    parser.add_argument("--gpu-processes", type=int, default=8, help="worker processes of the GPU end-to-end rows")
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
