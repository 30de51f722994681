"""Read-miss latency (publish → vector committed), on an idle worker and behind queued work.

    python benchmarks/bench_read_miss.py                                # idle, 2,000 changes, 2,000 backfill
    python benchmarks/bench_read_miss.py --loads idle --fetch-waits 1500,100
    python benchmarks/bench_read_miss.py --misses 200 --rate 5 --queued 2000
    python benchmarks/bench_read_miss.py --loads backfill --processes 2

Embedded services of its own and ``segue worker --processes`` (default 1) with the production
batch settings, on topics of two partitions (or one a process). SciFact
abstracts are stored with a static model only; MiniLM is registered after, so each of them
misses its MiniLM vector. Each load then gets ``--misses`` read misses paced at ``--rate`` a
second, for abstracts nobody asked for before:

- ``idle``: nothing else queued (once per ``--fetch-waits`` value,
  ``SEGUE_KAFKA_FETCH_MAX_WAIT_MS``; 1,500 ms is what Faust's driver hard-codes);
- ``changes``: published right after ``--queued`` new abstracts (both models embed each);
- ``backfill``: published right after ``--queued`` backfill requests for stored abstracts.

The latency is the changelog's own ``latency_ms`` (record timestamp → commit) of each
``embedded`` read-miss row. Prints p50/p95/p99 per load, and how much of the queued work
was still waiting when the last read miss was committed (the misses did not just wait it out).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from benchmarks.common import TEXT_CHARS, production_env, static_model, wait_workers_ready  # noqa: E402
from segue.control import registry  # noqa: E402
from segue.devtools.corpus import scifact_documents  # noqa: E402
from segue.devtools.modelkit import minilm_path  # noqa: E402
from segue.schemas.events import encode_read_miss  # noqa: E402
from tests.harness import Harness, change, harness_env, wait_for  # noqa: E402

MODEL = "minilm"


@dataclass(frozen=True)
class Latency:
    """Read-miss latencies of one load, in milliseconds, and the queued work left when they were done."""

    load: str
    p50: float
    p95: float
    p99: float
    top: float
    queued_left: int


async def publish_paced(bootstrap: str, topic: str, doc_ids: list[str], rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for doc_id in doc_ids:
            await (await producer.send(topic, key=doc_id.encode(), value=encode_read_miss(doc_id, MODEL, "bench")))
            await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()


def embedded(h: Harness, doc_ids: list[str], origin: str = "read_miss") -> int:
    """How many of ``doc_ids`` have an ``embedded`` changelog row of ``origin`` for MiniLM."""
    return h.scalar("SELECT count(DISTINCT doc_id) FROM migration_changelog WHERE origin = %s AND action = 'embedded'"
                    " AND model_version = (SELECT max(version) FROM embedding_models WHERE name = %s) AND doc_id = ANY(%s)",
                    (origin, MODEL, doc_ids))


def latencies(h: Harness, load: str, doc_ids: list[str], queued: list[str], origin: str) -> Latency:
    p50, p95, p99, top = h.sql(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms), max(latency_ms)"
        " FROM migration_changelog WHERE origin = 'read_miss' AND action = 'embedded' AND doc_id = ANY(%s)",
        (doc_ids,))[0]
    left = len(queued) - embedded(h, queued, origin) if queued else 0
    return Latency(load, p50, p95, p99, top, left)


class ReadMissBench:
    """A stored corpus missing its MiniLM vectors, and a worker to send read misses to."""

    def __init__(self, *, misses: int, queued: int, loads: list[str], fetch_waits: list[int], processes: int = 1):
        self.misses, self.queued, self.processes = misses, queued, processes
        data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-read-miss-"))
        self.h = Harness(data_dir, {**harness_env(data_dir), "SEGUE_TOPIC_PARTITIONS": str(max(2, processes))})
        self.env = production_env(self.h) | {"SEGUE_WORKER_PROCESSES": str(processes)}
        texts = [doc.text[:TEXT_CHARS] for doc in scifact_documents()]
        rounds = max(len(fetch_waits), 1) * ("idle" in loads) + sum(load != "idle" for load in loads)
        stored = rounds * (misses + 1) + queued * ("backfill" in loads)
        self.texts = [texts[n % len(texts)] for n in range(stored + queued)]
        self.stored = [f"sf-{n}" for n in range(stored)]
        self._next = 0
        registry.register_model(self.h.conn, "static", str(static_model(64)))
        worker = self.h.start_worker(self.env)
        self.h.publish_changes([(i, change(i, text, 1)) for i, text in zip(self.stored, self.texts)])
        wait_for(lambda: self.h.scalar("SELECT count(*) FROM documents WHERE doc_id LIKE 'sf-%%'") == stored,
                 timeout=600, what="the corpus stored")
        self.h.stop_worker(worker)
        registry.register_model(self.h.conn, MODEL, str(minilm_path()))

    def take(self, count: int) -> list[str]:
        """Stored abstracts no read miss or backfill asked for yet."""
        taken = self.stored[self._next:self._next + count]
        self._next += count
        return taken

    def run(self, load: str, rate: float, fetch_wait: int | None = None) -> Latency:
        """Start a worker, warm it with one miss, queue the load's work, then time ``misses`` read misses."""
        env = self.env | ({"SEGUE_KAFKA_FETCH_MAX_WAIT_MS": str(fetch_wait)} if fetch_wait else {})
        worker = self.h.start_worker(env)
        try:
            warm_up = self.take(1)
            asyncio.run(publish_paced(self.h.bootstrap, self.h.settings.topic_read_misses, warm_up, rate))
            wait_for(lambda: embedded(self.h, warm_up) == 1, timeout=300, what="the worker ready and its model warm")
            wait_workers_ready(self.h, self.processes)
            queued, origin = self.queue(load)
            batch = self.take(self.misses)
            asyncio.run(publish_paced(self.h.bootstrap, self.h.settings.topic_read_misses, batch, rate))
            wait_for(lambda: embedded(self.h, batch) == len(batch), timeout=900, what="every read miss embedded")
            result = latencies(self.h, load if fetch_wait is None else f"idle, fetch wait {fetch_wait} ms",
                               batch, queued, origin)
            if queued:
                wait_for(lambda: embedded(self.h, queued, origin) == len(queued), timeout=1800,
                         what="the queued work done")
            return result
        finally:
            self.h.stop_worker(worker)

    def queue(self, load: str) -> tuple[list[str], str]:
        """Publish the load's queued work; return its document ids and the changelog origin of its rows."""
        if load == "changes":
            ids = [f"new-{n}" for n in range(self.queued)]
            texts = self.texts[len(self.stored):len(self.stored) + self.queued]
            self.h.publish_changes([(i, change(i, text, 1)) for i, text in zip(ids, texts)])
            return ids, "change"
        if load == "backfill":
            ids = self.take(self.queued)
            self.h.publish(self.h.settings.topic_backfill, [(i, encode_read_miss(i, MODEL, "bench")) for i in ids])
            return ids, "backfill"
        return [], ""

    def close(self) -> None:
        self.h.close()


def measure(*, misses: int, rate: float, queued: int, loads: list[str], fetch_waits: list[int],
            processes: int = 1) -> list[Latency]:
    """Every load's read-miss latencies, a ``segue worker --processes`` per load on the same services."""
    bench = ReadMissBench(misses=misses, queued=queued, loads=loads, fetch_waits=fetch_waits, processes=processes)
    try:
        results = []
        for load in loads:
            if load == "idle" and fetch_waits:
                results.extend(bench.run(load, rate, wait) for wait in fetch_waits)
            else:
                results.append(bench.run(load, rate))
        return results
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--misses", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0, help="read misses published a second")
    parser.add_argument("--queued", type=int, default=2000, help="changes or backfill requests queued first")
    parser.add_argument("--loads", default="idle,changes,backfill")
    parser.add_argument("--fetch-waits", default="", help="SEGUE_KAFKA_FETCH_MAX_WAIT_MS values to compare (idle)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (segue worker --processes)")
    args = parser.parse_args()
    waits = [int(value) for value in args.fetch_waits.split(",") if value]
    results = measure(misses=args.misses, rate=args.rate, queued=args.queued, loads=args.loads.split(","),
                      fetch_waits=waits, processes=args.processes)
    print(f"{args.misses} read misses at {args.rate:g}/s, MiniLM, {args.processes} worker process(es), "
          f"{max(2, args.processes)} partitions")
    print(f"{'load':<28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'queued left':>12}")
    for r in results:
        print(f"{r.load:<28} {r.p50:>8.0f} {r.p95:>8.0f} {r.p99:>8.0f} {r.top:>8.0f} {r.queued_left:>12}")


if __name__ == "__main__":
    main()
