"""Change pipeline throughput: the non-model path, and end to end against raw encode.

    python benchmarks/bench_pipeline.py [--events 20000] [--docs 300] [--processes 1,2] [--profile DIR]

Embedded services of its own, ``segue worker`` with Segue's default batch settings, the
changelog's own clock: from the first record's publication (a row's ``at`` less its
``latency_ms``) to the last ``embedded`` row of the run:

- non-model path: ``--events`` short upserts embedded with two static models (model2vec,
  64-d and 128-d), published while the worker is idle, with each worker-process count of
  ``--processes`` in turn (topics of as many partitions); events a second, and the cores each
  part (workers, PostgreSQL, broker, publisher) kept busy; with ``--profile``, where each
  worker's main thread went (py-spy);
- end to end: ``--docs`` SciFact abstracts embedded with a static model and MiniLM, in docs a
  second, divided by the raw encode rate of the same two models on the same texts in this
  process (the engine's ``embed_sync``, one after the other): the share of the model's
  speed the pipeline keeps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from benchmarks.common import (  # noqa: E402
    TEXT_CHARS,
    CpuMeter,
    Profiler,
    describe_cores,
    production_env,
    static_model,
    wait_workers_ready,
)
from segue.control import registry  # noqa: E402
from segue.devtools.corpus import scifact_documents  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402
from segue.embedding.engine import EmbeddingEngine  # noqa: E402
from tests.harness import Harness, change, harness_env, wait_for  # noqa: E402


@dataclass(frozen=True)
class Throughput:
    """Events a second through a worker, and (end to end) the raw encode rate of the same models."""

    events_per_s: float
    raw_per_s: float | None = None
    cores: dict[str, float] | None = None  # cores each part of the run kept busy (CpuMeter)


def run_worker(h: Harness, prefix: str, texts: list[str], versions: int, processes: int = 1,
               profile: Path | None = None) -> tuple[float, dict[str, float]]:
    """Publish one change per text to an idle ``segue worker --processes``: the changelog's rate for them, in
    events a second, and the cores each part of the run kept busy meanwhile (with ``profile``, py-spy samples each
    worker process into that folder, and a summary is printed)."""
    worker = h.start_worker({**production_env(h), "SEGUE_WORKER_PROCESSES": str(processes)})
    try:
        h.wait_ready(worker, timeout=300)
        wait_workers_ready(h, processes)
        ids = [f"{prefix}-{n}" for n in range(len(texts))]
        meter = CpuMeter(h, worker.pid)
        profiler = Profiler(worker.pid, profile, f"{processes}-processes") if profile else None
        meter.start()
        if profiler:
            profiler.start()
        h.publish_changes([(i, change(i, text, 1)) for i, text in zip(ids, texts)])
        wait_for(lambda: h.scalar("SELECT count(*) FROM migration_changelog WHERE action = 'embedded'"
                                  " AND doc_id LIKE %s", (f"{prefix}-%",)) == len(ids) * versions,
                 timeout=3600, interval=0.2, what="every change embedded")
        cores = meter.stop()
        if profiler:
            print(profiler.stop(), flush=True)
        seconds = h.scalar("SELECT extract(epoch FROM max(at) - min(at - latency_ms * interval '1 millisecond'))"
                           " FROM migration_changelog WHERE action = 'embedded' AND doc_id LIKE %s", (f"{prefix}-%",))
        return len(ids) / float(seconds), cores
    finally:
        h.stop_worker(worker)


def _harness(processes: int) -> Harness:
    """Embedded services of a run's own, with a partition (at least two) for each worker process."""
    data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-pipeline-"))
    return Harness(data_dir, {**harness_env(data_dir), "SEGUE_TOPIC_PARTITIONS": str(max(2, processes))})


def non_model_path(events: int, processes: tuple[int, ...] = (1,), profile: Path | None = None,
                   ) -> dict[int, Throughput]:
    """Short upserts through two static models, by worker processes (each count on the same services, in turn)."""
    h = _harness(max(processes))
    try:
        for dims in (64, 128):
            registry.register_model(h.conn, f"static-{dims}", str(static_model(dims)))
        texts = [f"short update {n}: p53 regulates the cell cycle" for n in range(events)]
        rates = {count: run_worker(h, f"short{count}", texts, versions=2, processes=count, profile=profile) for count in processes}
        return {count: Throughput(rate, cores=cores) for count, (rate, cores) in rates.items()}
    finally:
        h.close()


def end_to_end(docs: int, models: list[tuple[str, str, dict]] | None = None, repeat: int = 1,
               processes: int = 1) -> Throughput:
    """SciFact abstracts (the first ``docs``, ``repeat`` times over) through ``models`` (name, source, options;
    default a static model and MiniLM) by ``segue worker --processes``, and the raw encode rate of the same models
    on the same texts."""
    h = _harness(processes)
    try:
        models = models or [("static-256", str(static_model(256)), {}), ("minilm", str(minilm_path()), {})]
        specs = [registry.register_model(h.conn, name, source, options=options) for name, source, options in models]
        texts = [doc.text[:TEXT_CHARS] for doc in scifact_documents(docs)] * repeat
        engine = EmbeddingEngine.from_settings(h.settings)
        try:
            for spec in specs:
                engine.embed_sync(spec, texts[:8])  # load, warm up, time a few passes
            started = time.perf_counter()
            for spec in specs:
                engine.embed_sync(spec, texts)
            raw = len(texts) / (time.perf_counter() - started)
        finally:
            engine.close()
        rate, cores = run_worker(h, "abstract", texts, versions=len(specs), processes=processes)
        return Throughput(rate, raw, cores)
    finally:
        h.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="short upserts for the non-model path")
    parser.add_argument("--docs", type=int, default=300, help="abstracts end to end (0: skip)")
    parser.add_argument("--processes", default="1,2", help="worker processes for the non-model path, in turn")
    parser.add_argument("--profile", type=Path, help="sample the workers of the non-model path with py-spy into this "
                        "folder and print where their main threads went")
    args = parser.parse_args()
    for count, lean in non_model_path(args.events, tuple(map(int, args.processes.split(","))), args.profile).items():
        print(f"non-model path, {args.events:,} short upserts, two static models, {count} process(es): "
              f"{lean.events_per_s:,.0f} events/s; {describe_cores(lean.cores)}")
    if not args.docs:
        return
    full = end_to_end(args.docs)
    print(f"end to end, {args.docs} abstracts, static-256 + MiniLM: {full.events_per_s:.2f} docs/s; raw encode "
          f"{full.raw_per_s:.2f} docs/s; ratio {full.events_per_s / full.raw_per_s:.3f}")


if __name__ == "__main__":
    main()
