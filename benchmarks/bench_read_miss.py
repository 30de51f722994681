"""Read-miss latency on an idle worker: publish → vector committed, by the worker's fetch long-poll.

    python benchmarks/bench_read_miss.py                       # 100 misses at 2/s, fetch waits 1500 and 100 ms
    python benchmarks/bench_read_miss.py --misses 200 --rate 5 --fetch-waits 1500,100,20

Embedded services of its own; SciFact abstracts stored without a MiniLM vector (the model is
registered after they are), then one worker per fetch wait (``SEGUE_KAFKA_FETCH_MAX_WAIT_MS``;
1,500 ms is what Faust's driver hard-codes) gets read misses for them, paced at ``--rate`` a
second. The latency is the changelog's own ``latency_ms`` (record timestamp → commit) of each
``embedded`` read-miss row. Prints p50/p95/p99 per fetch wait.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from segue import registry  # noqa: E402
from segue.corpus import scifact_documents  # noqa: E402
from segue.modelkit import minilm_path  # noqa: E402
from segue.schemas.events import encode_read_miss  # noqa: E402
from tests.harness import Harness, change, wait_for  # noqa: E402

MODEL = "minilm"


async def publish_paced(bootstrap: str, topic: str, doc_ids: list[str], rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for doc_id in doc_ids:
            await (await producer.send(topic, key=doc_id.encode(), value=encode_read_miss(doc_id, MODEL, "bench")))
            await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()


def embedded(h: Harness, doc_ids: list[str]) -> int:
    return h.scalar("SELECT count(*) FROM migration_changelog WHERE origin = 'read_miss' AND action = 'embedded'"
                    " AND doc_id = ANY(%s)", (doc_ids,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--misses", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2.0, help="read misses published a second")
    parser.add_argument("--fetch-waits", default="1500,100", help="SEGUE_KAFKA_FETCH_MAX_WAIT_MS values to compare")
    args = parser.parse_args()
    waits = [int(value) for value in args.fetch_waits.split(",")]

    h = Harness(Path(tempfile.mkdtemp(prefix="segue-bench-read-miss-")))
    try:
        documents = list(scifact_documents((args.misses + 1) * len(waits)))
        ids = [f"sf-{n}" for n in range(len(documents))]
        worker = h.start_worker()
        h.publish_changes([(i, change(i, d.text[:3000], 1)) for i, d in zip(ids, documents)])
        wait_for(lambda: h.scalar("SELECT count(*) FROM documents WHERE doc_id LIKE 'sf-%%'") == len(ids),
                 timeout=300, what="the corpus stored")
        h.stop_worker(worker)
        registry.register_model(h.conn, MODEL, str(minilm_path()))
        print(f"{args.misses} read misses at {args.rate:g}/s per fetch wait, MiniLM, idle worker, 2 partitions")
        print(f"{'fetch wait ms':>14} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for n, wait in enumerate(waits):
            worker = h.start_worker(h.env | {"SEGUE_KAFKA_FETCH_MAX_WAIT_MS": str(wait)})
            warm_up, batch = [ids[-1 - n]], ids[n * args.misses:(n + 1) * args.misses]
            asyncio.run(publish_paced(h.bootstrap, h.settings.topic_read_misses, warm_up, args.rate))
            wait_for(lambda: embedded(h, warm_up) == 1, timeout=300, what="the worker ready and its model warm")
            asyncio.run(publish_paced(h.bootstrap, h.settings.topic_read_misses, batch, args.rate))
            wait_for(lambda: embedded(h, batch) == len(batch), timeout=600, what="every read miss embedded")
            p50, p95, p99, top = h.sql(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),"
                " percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),"
                " percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms), max(latency_ms)"
                " FROM migration_changelog WHERE origin = 'read_miss' AND action = 'embedded' AND doc_id = ANY(%s)",
                (batch,))[0]
            print(f"{wait:>14} {p50:>8.0f} {p95:>8.0f} {p99:>8.0f} {top:>8.0f}", flush=True)
            h.stop_worker(worker)
    finally:
        h.close()


if __name__ == "__main__":
    main()
