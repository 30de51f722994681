"""``segue demo``: the whole flow on fresh embedded services with a real corpus.

Starts a sandboxed embedded PostgreSQL and broker, registers an old model (a static
model distilled locally from all-MiniLM-L6-v2) and, halfway, a new one (MiniLM
itself) that the running worker picks up live; publishes SciFact abstracts as
document changes, edits, deletes, stale replays, read misses and bad events; shows
progress from SQL as it goes and ends with a summary.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from app import db, registry, services
from app.corpus import scifact_documents
from app.modelkit import distill_static, minilm_path
from app.progress import fetch_progress, progress_table
from app.settings import Settings
from app.topics import consumer_lag, ensure_topics

OLD_MODEL = "minilm-static-256"
NEW_MODEL = "minilm-l6"
STATIC_DIMS = 256


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


def _change(doc_id: str, text: str | None, version: int, *, op: str = "upsert", event_id: str) -> bytes:
    value = {"doc_id": doc_id, "op": op, "version": version, "event_id": event_id}
    if text is not None:
        value["text"] = text
    return orjson.dumps(value)


class _Publisher:
    def __init__(self, settings: Settings, bootstrap: str):
        self.settings = settings
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.sent = 0

    async def __aenter__(self) -> _Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def change(self, key: str, value: bytes | None) -> None:
        await self.producer.send(self.settings.topic_document_changes, key=key.encode(), value=value)
        self.sent += 1

    async def read_miss(self, key: str, value: bytes) -> None:
        await self.producer.send(self.settings.topic_read_misses, key=key.encode(), value=value)
        self.sent += 1


async def _watch(settings: Settings, database_url: str, bootstrap: str, console: Console, title: str) -> float:
    """Show migration_progress until the worker has committed every published record."""
    started = time.perf_counter()
    with db.connect(settings, database_url, autocommit=True) as conn, Live(console=console, refresh_per_second=2) as live:
        while True:
            await asyncio.sleep(1.0)
            lag = await consumer_lag(settings, bootstrap)
            elapsed = time.perf_counter() - started
            live.update(
                Group(
                    progress_table(fetch_progress(conn), title=f"{title} — {elapsed:.0f}s"),
                    f"records not yet processed: {sum(lag.values())} ({', '.join(f'{t}: {n}' for t, n in lag.items())})",
                )
            )
            if sum(lag.values()) == 0:
                return elapsed


def _summary(settings: Settings, database_url: str, elapsed: float, console: Console) -> None:
    with db.connect(settings, database_url, autocommit=True) as conn:
        console.print(progress_table(fetch_progress(conn), title="final migration_progress"))
        table = Table(title="changelog outcomes")
        for header in ("origin", "model", "action", "events", "p50 latency ms", "p95 latency ms"):
            table.add_column(header)
        for row in conn.execute(
            "SELECT c.origin, coalesce(m.name, '–'), c.action, count(*),"
            " round(percentile_cont(0.5) WITHIN GROUP (ORDER BY c.latency_ms)::numeric),"
            " round(percentile_cont(0.95) WITHIN GROUP (ORDER BY c.latency_ms)::numeric)"
            " FROM migration_changelog c LEFT JOIN embedding_models m ON m.version = c.model_version"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ):
            table.add_row(*(str(v) for v in row))
        console.print(table)
        dead = conn.execute(
            "SELECT split_part(error, ':', 1), count(*) FROM migration_changelog"
            " WHERE action = 'dead_lettered' GROUP BY 1 ORDER BY 1"
        ).fetchall()
        (embedded,) = conn.execute("SELECT count(*) FROM migration_changelog WHERE action = 'embedded'").fetchone()
        (documents,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
    console.print(
        f"[bold]summary[/]: {documents} documents, {embedded} vectors embedded in {elapsed:.1f}s of processing "
        f"= {embedded / elapsed:.1f} vectors/s on this machine; dead letters: "
        + (", ".join(f"{reason} {n}" for reason, n in dead) or "none")
    )


def run_demo(settings: Settings, *, docs: int, console: Console) -> None:
    """Run the demo end to end (see the module docstring)."""
    asyncio.run(_run(settings, docs=docs, console=console))


async def _run(settings: Settings, *, docs: int, console: Console) -> None:
    demo = _sandbox(settings)
    console.rule("[bold]Segue demo")
    if demo.data_dir.exists():
        services.down(demo)
        shutil.rmtree(demo.data_dir)
    started = time.perf_counter()
    database_url = services.database_url(demo)
    bootstrap = services.kafka_bootstrap(demo)
    db.bootstrap(demo, database_url)
    await ensure_topics(demo, bootstrap)
    console.print(f"embedded PostgreSQL and Kafka broker up in {time.perf_counter() - started:.1f}s ({demo.data_dir})")

    started = time.perf_counter()
    static_dir = distill_static(str(minilm_path()), settings.data_dir / "models" / OLD_MODEL, dims=STATIC_DIMS)
    console.print(f"old model: {OLD_MODEL}, distilled from all-MiniLM-L6-v2 with model2vec "
                  f"({time.perf_counter() - started:.1f}s, cached in {static_dir})")
    with db.connect(demo, database_url) as conn:
        old = registry.register_model(conn, OLD_MODEL, str(static_dir))
    console.print(f"registered {OLD_MODEL} as v{old.version} ({old.dim}-d): readers use it")

    corpus = list(scifact_documents(docs))
    first, rest = corpus[: len(corpus) // 3], corpus[len(corpus) // 3:]
    log_path = demo.data_dir / "worker.log"
    with open(log_path, "wb") as worker_log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"], env=_worker_env(demo), stdout=worker_log,
            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
        )
    try:
        console.print(f"worker started (pid {worker.pid}, log {log_path})")
        async with _Publisher(demo, bootstrap) as pub:
            for n, doc in enumerate(first):
                await pub.change(doc.doc_id, _change(doc.doc_id, doc.text, 1, event_id=f"load-{n}"))
            await pub.producer.flush()
            console.print(f"published {len(first)} documents while only {OLD_MODEL} is live")
            elapsed = await _watch(demo, database_url, bootstrap, console, f"phase 1: {OLD_MODEL} only")

            with db.connect(demo, database_url) as conn:
                new = registry.register_model(conn, NEW_MODEL, str(minilm_path()))
            console.print(f"registered {NEW_MODEL} as v{new.version} ({new.dim}-d); the running worker picks it up "
                          "and dual-writes every change from now on")
            for n, doc in enumerate(rest):
                await pub.change(doc.doc_id, _change(doc.doc_id, doc.text, 1, event_id=f"load-{len(first) + n}"))
            for n, doc in enumerate(first[:20]):
                await pub.change(doc.doc_id, _change(doc.doc_id, doc.text, 2, event_id=f"touch-{n}"))
            for n, doc in enumerate(first[20:40]):
                edited = doc.text + "\n\nErratum: corrected figures in the results section."
                await pub.change(doc.doc_id, _change(doc.doc_id, edited, 2, event_id=f"edit-{n}"))
                await pub.change(doc.doc_id, _change(doc.doc_id, doc.text, 1, event_id=f"replay-{n}"))
            for n, doc in enumerate(first[40:45]):
                await pub.change(doc.doc_id, _change(doc.doc_id, None, 3, op="delete", event_id=f"delete-{n}"))
            for doc in first[45:50]:
                await pub.change(doc.doc_id, None)
            for n, doc in enumerate(first[50:100]):
                await pub.read_miss(doc.doc_id, orjson.dumps({"doc_id": doc.doc_id, "model": NEW_MODEL,
                                                              "event_id": f"miss-{n}"}))
            await pub.change("bad-json", b'{"doc_id": "bad-json", "text": ')
            await pub.change("no-version", orjson.dumps({"doc_id": "no-version", "text": "hello"}))
            await pub.change("huge", _change("huge", "x" * (demo.max_text_bytes + 1), 1, event_id="huge"))
            await pub.read_miss(first[0].doc_id, orjson.dumps({"doc_id": first[0].doc_id, "model": "no-such-model"}))
            await pub.read_miss("missing-doc", orjson.dumps({"doc_id": "missing-doc", "model": NEW_MODEL}))
            await pub.producer.flush()
            console.print(
                f"published {len(rest)} more documents, 20 unchanged re-publishes, 20 edits with 20 stale replays, "
                "5 deletes, 5 tombstones, 50 read misses and 5 bad events"
            )
            elapsed += await _watch(demo, database_url, bootstrap, console, "phase 2: dual-write")
        _summary(demo, database_url, elapsed, console)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        services.down(demo)
