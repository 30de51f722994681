"""``segue demo``: a whole migration on fresh embedded services with a real corpus.

Starts a sandboxed embedded PostgreSQL and broker and a worker; loads SciFact
abstracts on an old model (a static model distilled locally from all-MiniLM-L6-v2);
plans and starts a migration to MiniLM itself, which the running worker picks up
live; publishes live changes, edits, deletes, stale replays and bad events while the
backfill runs and reader queries publish read misses; then records a quality verdict
(nDCG@10 on SciFact), builds the HNSW index, cuts over, rolls back, cuts over again
and finishes. Progress comes from SQL throughout; a summary closes it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from segue.cli.views import fetch_progress, format_cell, progress_table
from segue.client.reader import SegueReader
from segue.control import indexes, migration, registry
from segue.control.backfill import BackfillLimits, run_backfill
from segue.control.plan import plan
from segue.devtools import services
from segue.devtools.corpus import scifact_documents, scifact_queries_list
from segue.devtools.modelkit import STATIC_256, bundled_model, minilm_path
from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.quality import evaluation
from segue.schemas.changelog import Action
from segue.schemas.events import encode_change, encode_read_miss
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import changelog, connections, model_columns, upgrades
from segue.worker.topics import ensure_topics

OLD_MODEL = STATIC_256
NEW_MODEL = "minilm-l6"


def _sandbox(settings: Settings) -> Settings:
    """Settings for a private set of embedded services under ``<data_dir>/demo``."""
    return settings.model_copy(
        update={
            "data_dir": settings.data_dir / "demo",
            "embedded_kafka_port": settings.embedded_kafka_port + 1,
            "kafka_url": None,
            "database_url": None,
        }
    )


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGUE_")}
    env.update(
        SEGUE_DATA_DIR=str(settings.data_dir),
        SEGUE_EMBEDDED_KAFKA_PORT=str(settings.embedded_kafka_port),
        SEGUE_LOG_LEVEL="info",
    )
    return env


class _Publisher:
    def __init__(self, settings: Settings, bootstrap: str, console: Console):
        self.settings = settings
        self.console = console
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)

    async def __aenter__(self) -> _Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def change(self, key: str, value: bytes | None) -> None:
        await self.producer.send(self.settings.topic_document_changes, key=key.encode(), value=value)

    async def read_miss(self, key: str, value: bytes) -> None:
        await self.producer.send(self.settings.topic_read_misses, key=key.encode(), value=value)

    async def markers(self, phase: str, known_doc: str | None = None) -> list[str]:
        """One no-op record per partition of the change topic and, with a stored ``known_doc``, of the
        read-miss topic; returns their event ids."""
        ids = []
        for partition in sorted(await self.producer.partitions_for(self.settings.topic_document_changes)):
            ids.append(f"marker-{phase}-changes-{partition}")
            await self.producer.send(self.settings.topic_document_changes, key=b"segue-demo-marker",
                                     value=encode_change("segue-demo-marker", version=0, op="delete", event_id=ids[-1]),
                                     partition=partition)
        read_miss_partitions = await self.producer.partitions_for(self.settings.topic_read_misses)
        for partition in sorted(read_miss_partitions) if known_doc else ():
            ids.append(f"marker-{phase}-misses-{partition}")
            await self.producer.send(self.settings.topic_read_misses, key=known_doc.encode(),
                                     value=encode_read_miss(known_doc, OLD_MODEL, ids[-1]), partition=partition)
        await self.producer.flush()
        return ids


async def _watch(settings: Settings, database_url: str, console: Console, title: str, markers: list[str],
                 covered_model: str | None = None) -> float:
    """Show migration_progress from SQL until every marker is logged (and ``covered_model`` is at 100 %).

    Markers trail the phase's records in every partition, so once the worker has logged
    them it has processed everything published before them.
    """
    started = time.perf_counter()
    terminal = console.is_terminal
    with connections.connect(settings, database_url) as conn, Live(console=console, auto_refresh=False,
                                                          transient=not terminal) as live:
        while True:
            await asyncio.sleep(2.0)
            elapsed = time.perf_counter() - started
            rows = fetch_progress(conn)
            logged = changelog.events_logged(conn, markers)
            done = logged == len(markers) and all(
                r["coverage_pct"] is not None and float(r["coverage_pct"]) >= 100.0
                for r in rows if covered_model is None or r["model"] == covered_model)
            if terminal:
                live.update(progress_table(rows, title=f"{title} — {elapsed:.0f}s", width=console.width),
                            refresh=True)
            else:
                console.print(f"  {elapsed:5.0f}s  " + "; ".join(
                    f"{r['model']}: {r['coverage_pct']}% ({r['current_vectors']}/{r['total_documents']}), "
                    f"{r['rate_per_s']} vec/s, ETA {format_cell(r['eta'])}" for r in rows))
            if done:
                return elapsed


def _summary(settings: Settings, database_url: str, elapsed: float, console: Console) -> None:
    with connections.connect(settings, database_url) as conn:
        console.print(progress_table(fetch_progress(conn), title="final migration_progress", width=console.width))
        table = Table(title="changelog outcomes")
        for header in ("origin", "model", "action", "events", "p50 latency ms", "p95 latency ms"):
            table.add_column(header)
        for row in changelog.outcomes(conn):
            table.add_row(*(str(v) for v in row))
        console.print(table)
        dead = changelog.dead_letters_by_reason(conn)
        embedded = changelog.rows_of(conn, Action.EMBEDDED)
        documents = model_columns.document_count(conn)
    console.print(
        f"[bold]summary[/]: {documents} documents on two models in {elapsed:.1f}s of processing = "
        f"{documents / elapsed:.1f} docs/s ({embedded} vectors, {embedded / elapsed:.1f} vectors/s) on this machine; "
        "dead letters: " + (", ".join(f"{reason} {n}" for reason, n in dead) or "none")
    )


def run_demo(settings: Settings, *, docs: int, console: Console) -> None:
    """Run the demo end to end (see the module docstring)."""
    asyncio.run(_run(settings, docs=docs, console=console))


async def _run(settings: Settings, *, docs: int, console: Console) -> None:
    demo = _sandbox(settings)
    console.rule("[bold]Segue demo: migrating a pgvector corpus from a static model to MiniLM")
    if demo.data_dir.exists():
        services.down(demo)
        shutil.rmtree(demo.data_dir)
    started = time.perf_counter()
    database_url = services.database_url(demo)
    bootstrap = services.kafka_bootstrap(demo)
    upgrades.upgrade(demo, database_url)
    await ensure_topics(demo, bootstrap)
    console.print(f"embedded PostgreSQL and Kafka broker up in {time.perf_counter() - started:.1f}s ({demo.data_dir})")

    started = time.perf_counter()
    static_dir = bundled_model(STATIC_256, settings.data_dir)
    console.print(f"old model: {OLD_MODEL}, distilled from all-MiniLM-L6-v2 with model2vec "
                  f"({time.perf_counter() - started:.1f}s, cached in {static_dir})")
    with connections.connect(demo, database_url) as conn:
        old = registry.register_model(conn, OLD_MODEL, str(static_dir))
    console.print(f"registered {OLD_MODEL} as v{old.version} ({old.dim}-d): readers use it")

    corpus = list(scifact_documents(docs))
    first, rest = corpus[: len(corpus) * 2 // 3], corpus[len(corpus) * 2 // 3:]
    log_path = demo.data_dir / "worker.log"
    engine = EmbeddingEngine.from_settings(demo)
    with open(log_path, "wb") as worker_log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "segue.cli", "worker"], env=_worker_env(demo), stdout=worker_log,
            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
        )
    try:
        console.print(f"worker started (pid {worker.pid}, log {log_path})")
        async with _Publisher(demo, bootstrap, console) as pub:
            console.rule("1. the corpus, on the old model only")
            for n, doc in enumerate(first):
                await pub.change(doc.doc_id, encode_change(doc.doc_id, version=1, text=doc.text, event_id=f"load-{n}"))
            await pub.producer.flush()
            console.print(f"published {len(first)} SciFact abstracts as document changes")
            elapsed = await _watch(demo, database_url, console, f"{OLD_MODEL} only",
                                   await pub.markers("load"))

            console.rule("2. plan the migration to all-MiniLM-L6-v2")
            new_spec = ModelSpec.from_profile(0, NEW_MODEL, str(minilm_path()), providers.inspect(str(minilm_path())))
            with connections.connect(demo, database_url) as conn:
                for line in plan(conn, engine, new_spec, sample=32, gpu_hour_usd=demo.gpu_hour_usd,
                                 index_policy=indexes.IndexPolicy.from_settings(demo)).lines():
                    console.print("  " + line)

            console.rule("3. start: dual-write live changes, backfill the rest, re-embed read misses first")
            with connections.connect(demo, database_url) as conn:
                new = registry.register_model(conn, NEW_MODEL, str(minilm_path()))
                started_migration = migration.start(conn, NEW_MODEL,
                                                    cutover_min_coverage_pct=demo.cutover_min_coverage_pct)
            console.print(f"migration {started_migration.id}: {OLD_MODEL} → {NEW_MODEL} (v{new.version}, "
                          f"{new.dim}-d); the running worker picks the new model up without a restart")
            await _publish_changes(pub, first, rest, demo)
            with SegueReader(demo, database_url=database_url, engine=engine, read_model=NEW_MODEL) as canary:
                misses = 0
                for query in scifact_queries_list(8):
                    result = canary.search(query, k=10)
                    misses += len(result.read_misses)
                console.print(f"a canary reader on {NEW_MODEL} ran 8 queries (incremental mode: documents without a "
                              f"{NEW_MODEL} vector come from {OLD_MODEL}) and published {misses} read misses, "
                              "which the worker embeds ahead of queued changes and the backfill")
            with connections.connect(demo, database_url) as conn:
                outcome = await run_backfill(demo, conn, bootstrap, new, BackfillLimits(), console=console)
            console.print(outcome.describe(BackfillLimits()))
            elapsed += await _watch(demo, database_url, console, f"{OLD_MODEL} → {NEW_MODEL}",
                                    await pub.markers("migrate", first[-1].doc_id), covered_model=NEW_MODEL)

        console.rule("4. quality gate, index, cutover, rollback, cutover, finish")
        report = demo.data_dir / "eval.html"
        command = ["segue", "eval", "--scifact", "--report", str(report)]
        console.print("$ " + " ".join(command))
        judged = subprocess.run([sys.executable, "-m", "segue.cli", *command[1:]], env=_worker_env(demo),
                                capture_output=True, text=True, check=False)
        console.print(judged.stdout.rstrip() or judged.stderr.rstrip())
        with connections.connect(demo, database_url) as conn:
            console.print(progress_table(fetch_progress(conn), title="migration_progress before the cutover",
                                         width=console.width))
            ready = migration.refresh(conn)
            console.print(f"cutover gate: coverage {migration.coverage_pct(conn, new.version):.1f}%, "
                          f"{evaluation.latest_line(conn, started_migration)} → migration {ready.state}")
            built, message = indexes.build(conn, new.version, indexes.IndexPolicy.from_settings(demo))
            if not built:
                detail = changelog.latest_detail(conn, Action.INDEX_BUILT)
                message += (f": a worker built it once coverage reached {detail['coverage_pct']}% "
                            f"(m={detail['m']}, ef_construction={detail['ef_construction']}, "
                            f"maintenance_work_mem={detail['maintenance_work_mem_mb']}MB)")
            console.print(message)
            for step, action in (("cutover", lambda: migration.cutover(conn)),
                                 ("rollback", lambda: migration.rollback(conn)),
                                 ("cutover", lambda: migration.cutover(conn))):
                state = action()
                serving = next(m.spec.name for m in registry.list_models(conn) if m.serving_reads)
                console.print(f"{step}: migration {state.state}, reads served by {serving}")
            with SegueReader(demo, database_url=database_url, engine=engine) as reader:
                result = reader.search(scifact_queries_list(1)[0], k=3)
                console.print(f"reader after cutover: mode {result.mode}, model {'+'.join(result.models)}, "
                              f"top hit {result.hits[0].doc_id} ({result.hits[0].score:.3f})")
            done = migration.finish(conn, grace=timedelta(0))
            console.print(f"finish: migration {done.state}; {OLD_MODEL} retired, its columns dropped")
        _summary(demo, database_url, elapsed, console)
    finally:
        engine.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        services.down(demo)


async def _publish_changes(pub: _Publisher, first, rest, demo: Settings) -> None:
    """Live traffic during the migration: new documents, edits, replays, deletes, misses, bad events."""
    for n, doc in enumerate(rest):
        await pub.change(doc.doc_id, encode_change(doc.doc_id, version=1, text=doc.text, event_id=f"load-{len(first) + n}"))
    for n, doc in enumerate(first[:20]):
        await pub.change(doc.doc_id, encode_change(doc.doc_id, version=2, text=doc.text, event_id=f"touch-{n}"))
    for n, doc in enumerate(first[20:40]):
        edited = doc.text + "\n\nErratum: corrected figures in the results section."
        await pub.change(doc.doc_id, encode_change(doc.doc_id, version=2, text=edited, event_id=f"edit-{n}"))
        await pub.change(doc.doc_id, encode_change(doc.doc_id, version=1, text=doc.text, event_id=f"replay-{n}"))
    for n, doc in enumerate(first[40:45]):
        await pub.change(doc.doc_id, encode_change(doc.doc_id, version=3, op="delete", event_id=f"delete-{n}"))
    for doc in first[45:50]:
        await pub.change(doc.doc_id, None)
    await pub.change("bad-json", b'{"doc_id": "bad-json", "text": ')
    await pub.change("no-version", orjson.dumps({"doc_id": "no-version", "text": "hello"}))
    await pub.change("huge", encode_change("huge", version=1, text="x" * (demo.max_text_bytes + 1), event_id="huge"))
    await pub.read_miss(first[60].doc_id, orjson.dumps({"doc_id": first[60].doc_id, "model": "no-such-model"}))
    await pub.read_miss("missing-doc", orjson.dumps({"doc_id": "missing-doc", "model": NEW_MODEL}))
    await pub.producer.flush()
    pub.console.print(f"published {len(rest)} new documents, 20 unchanged re-publishes, 20 edits with 20 stale "
                      "replays, 5 deletes, 5 tombstones and 5 bad events")
