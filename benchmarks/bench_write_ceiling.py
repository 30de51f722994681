"""Benchmark: the PostgreSQL write ceiling of dual-writes, in documents and WAL bytes a second.

    python benchmarks/bench_write_ceiling.py                          # 20,000 documents a configuration
    python benchmarks/bench_write_ceiling.py --docs 5000 --writers 1 2

At GPU speed the embedding is no longer the limit: PostgreSQL is. This measures how fast one
embedded PostgreSQL takes the change pipeline's writes when every document carries the vectors
of two live models, a 384-d old one and a 768-d new one (a migration's dual-write), and how much
WAL that makes.

Each writer is a process with its own connection (a ``Store``, as a worker has), writing its own
share of new doc ids in batches of ``GPU_BATCH_SIZE`` (512, a GPU worker's batch). A batch goes
to the database as ``ChangeProcessor._apply`` sends it: the live models read from the registry,
the stored state of the batch's documents (``Store.fetch``), then one transaction of
``StoreTransaction.upsert_documents`` (a binary COPY into a staging table, then ``upsert_newer``)
with both models' vectors, and the batch's ``embedded`` changelog rows (one per document and
model, ``StoreTransaction.log``). Bodies are SciFact abstracts (the bundled corpus repeated,
each copy numbered), vectors random unit float32s; the rows are built before the clock starts,
so the writers' own work is encoding and sending them.

Configurations: without and with the old model's HNSW index (built with ``indexes.build`` and
the default policy, on the empty table: the graph grows from 0 to ``--docs`` nodes during the
run, so a large corpus's graph makes each insert dearer than here), at each number of writers.
Each configuration writes into a fresh database copied from a template holding Segue's schema
and the two registered models, right after a CHECKPOINT, with autovacuum off, on this embedded
server alone (its WAL is all the benchmark's).

Measured per configuration: seconds from the start of the first writer to the end of the last,
documents a second, WAL (``pg_current_wal_lsn`` before and after) a second and a document, the
CPU the PostgreSQL processes and the writer processes used (``/proc``, in cores busy), and what
the writers' backends were doing, sampled from ``pg_stat_activity`` every 20 ms: on CPU, waiting
on an event (``IO:WalSync``, ``LWLock:WALWrite``, ``Client:ClientRead`` while a COPY waits for
its data, …), or idle between transactions (waiting for the writer). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from psycopg import conninfo, sql

from segue.agents.worker import GPU_BATCH_SIZE
from segue.control import indexes
from segue.control.registry import register_model
from segue.devtools import services
from segue.devtools.corpus import scifact_documents
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import SourcePosition
from segue.settings import Settings
from segue.spec import ModelProfile
from segue.storage import connections, upgrades
from segue.storage.changelog import ChangelogRow
from segue.storage.documents import DocumentRow, Store

OLD_DIM, NEW_DIM = 384, 768
WRITERS = (1, 2, 4)
APPLICATION_NAME = "segue-write-ceiling"  # marks the writers' backends in pg_stat_activity
SAMPLE_INTERVAL_S = 0.02
TEMPLATE = "ceiling_template"
PARTITIONS = 4  # SEGUE_TOPIC_PARTITIONS: the source positions the rows carry
MiB = 2**20
SERVER_SETTINGS = ("shared_buffers", "wal_buffers", "synchronous_commit", "fsync", "full_page_writes", "wal_compression",
                   "max_wal_size")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CeilingRow:
    """One configuration: ``docs`` documents dual-written by ``writers`` connections, with or without the HNSW index."""

    hnsw: bool
    writers: int
    docs: int
    seconds: float
    wal_bytes: int
    postgres_cpu_s: float  # every PostgreSQL process but the benchmark's own observing connections
    writers_cpu_s: float  # the writer processes
    backend_states: dict[str, float] = field(default_factory=dict)  # share of the writers' backends' samples
    server: str = ""  # the PostgreSQL version and the settings that shape its writes

    @property
    def configuration(self) -> str:
        """The configuration in words."""
        index = "HNSW on the 384-d column" if self.hnsw else "no HNSW index"
        return f"{index}, {self.writers} writer{'s' if self.writers > 1 else ''}"

    @property
    def rows_per_s(self) -> float:
        """Documents dual-written a second."""
        return self.docs / self.seconds

    @property
    def wal_mib_per_s(self) -> float:
        """WAL MiB a second."""
        return self.wal_bytes / MiB / self.seconds

    @property
    def wal_kib_per_row(self) -> float:
        """WAL KiB a document."""
        return self.wal_bytes / 1024 / self.docs

    def busiest_states(self, count: int = 3) -> str:
        """The writers' backends' most frequent states, with their shares of the samples."""
        top = sorted(self.backend_states.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{state} {100 * share:.0f}%" for state, share in top)


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """``rows`` random unit vectors of ``dim`` float32s."""
    block = rng.standard_normal((rows, dim), dtype=np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def profile(name: str, dim: int) -> ModelProfile:
    """A static model's profile: registering it needs no model files."""
    return ModelProfile(provider="static", dim=dim, max_tokens=512, config={"normalize": True},
                        fingerprint=f"fingerprint-{name}")


def doc_batches(numbers: Sequence[int], batch: int, seed: int) -> list[tuple[list[DocumentRow], list[ChangelogRow]]]:
    """The documents ``numbers`` as the pipeline hands them to the store: rows with both models' vectors (model
    versions 1 and 2) and their ``embedded`` changelog rows, ``batch`` documents at a time."""
    corpus = [d.text for d in scifact_documents()]
    rng = np.random.default_rng(seed)
    batches = []
    for first in range(0, len(numbers), batch):
        chosen = numbers[first:first + batch]
        rows, changelog = [], []
        for n, old, new in zip(chosen, unit_vectors(rng, len(chosen), OLD_DIM), unit_vectors(rng, len(chosen), NEW_DIM)):
            body = f"{n}. {corpus[n % len(corpus)]}"
            doc_id = f"doc-{n:08d}"
            rows.append(DocumentRow(doc_id=doc_id, body=body, version=1,
                                    content_sha256=hashlib.sha256(body.encode()).digest(), metadata={},
                                    source=SourcePosition("document-changes", n % PARTITIONS, n),
                                    vectors={1: old, 2: new}))
            tokens = min(512, len(body) // 4)
            changelog += [ChangelogRow(doc_id, version, Action.EMBEDDED, Origin.CHANGE, doc_version=1,
                                       latency_ms=50.0, tokens_used=tokens, tokens_total=tokens) for version in (1, 2)]
        batches.append((rows, changelog))
    return batches


async def write_batches(store: Store, batches: list[tuple[list[DocumentRow], list[ChangelogRow]]]) -> None:
    """Send each batch as ``ChangeProcessor._apply`` does: registry, stored state, then one transaction."""
    for rows, changelog in batches:
        models = await store.computed_models()
        await store.retired_models()
        await store.fetch([r.doc_id for r in rows], models)
        async with store.transaction() as tx:
            applied = await tx.upsert_documents(rows, models)
            await tx.log(changelog)
        if len(applied) != len(rows):
            raise RuntimeError(f"{len(rows) - len(applied)} of {len(rows)} documents were not written")


def run_writer(settings: Settings, dsn: str, numbers: list[int], batch: int, seed: int, ready, go, results,
               done) -> None:
    """One writer process: build its rows, connect, wait for the start, write, report (start, end, CPU seconds),
    and keep the connection until ``done`` (its backend's CPU is read meanwhile)."""
    batches = doc_batches(numbers, batch, seed)

    async def write() -> None:
        store = Store(settings, dsn)
        try:
            await store.connection()
            ready.wait()
            go.wait()
            cpu, started = time.process_time(), time.monotonic()
            await write_batches(store, batches)
            results.put((started, time.monotonic(), time.process_time() - cpu))
            done.wait()
        finally:
            await store.close()

    asyncio.run(write())


def postgres_cpu_seconds(postmaster: int, excluded: set[int]) -> float:
    """CPU seconds used so far by the children of ``postmaster`` (the server's processes), but ``excluded``."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in excluded:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == postmaster:  # fields: state, ppid, …, utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def server_description(conn: psycopg.Connection) -> str:
    """The server's version and the settings that shape its writes, in one line."""
    (version,) = conn.execute("SHOW server_version").fetchone()
    shown = [f"{name} {conn.execute(sql.SQL('SHOW {}').format(sql.Identifier(name))).fetchone()[0]}"
             for name in SERVER_SETTINGS]
    return f"PostgreSQL {version}: " + ", ".join(shown)


def parent_pid(pid: int) -> int:
    """The parent of process ``pid``."""
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def sample_backends(conn: psycopg.Connection, stop: threading.Event, states: Counter) -> None:
    """Count the writers' backends' states in ``states`` every ``SAMPLE_INTERVAL_S`` until ``stop``."""
    while not stop.is_set():
        for (state,) in conn.execute(
            "SELECT CASE WHEN state <> 'active' THEN state"
            " ELSE coalesce(wait_event_type || ':' || wait_event, 'CPU') END"
            " FROM pg_stat_activity WHERE application_name = %s", (APPLICATION_NAME,)
        ):
            states[state] += 1
        stop.wait(SAMPLE_INTERVAL_S)


def collect(results, processes: Sequence[multiprocessing.process.BaseProcess]) -> list[tuple[float, float, float]]:
    """Each writer's (start, end, CPU seconds); raises as soon as a writer died without reporting."""
    spans: list[tuple[float, float, float]] = []
    while len(spans) < len(processes):
        try:
            spans.append(results.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a writer exited with status {failed[0]}") from None
    return spans


def run_configuration(settings: Settings, admin: psycopg.Connection, url: str, hnsw: bool, writers: int, docs: int,
                      batch: int) -> CeilingRow:
    """Copy the template into a fresh database, build the index if asked, and time ``writers`` writing ``docs``."""
    database = f"ceiling_{'hnsw' if hnsw else 'plain'}_{writers}"
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
        sql.Identifier(database), sql.Identifier(TEMPLATE)))
    try:
        dsn = conninfo.make_conninfo(url, dbname=database)
        if hnsw:
            with connections.connect(settings, dsn) as conn:
                indexes.build(conn, 1, indexes.IndexPolicy.from_settings(settings))
        order = np.random.default_rng(writers).permutation(docs).tolist()  # disjoint shares, ids all over the index
        writer_dsn = conninfo.make_conninfo(dsn, application_name=APPLICATION_NAME)
        context = multiprocessing.get_context("spawn")  # no connection of this process is inherited
        ready, go, done, results = (context.Barrier(writers + 1), context.Barrier(writers + 1), context.Event(),
                                    context.Queue())
        processes = [context.Process(target=run_writer, args=(settings, writer_dsn, order[w::writers], batch, w,
                                                              ready, go, results, done)) for w in range(writers)]
        states: Counter[str] = Counter()
        stop = threading.Event()
        for process in processes:
            process.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as observer:
                ready.wait(timeout=600)
                admin.execute("CHECKPOINT")
                postmaster = parent_pid(admin.info.backend_pid)
                observers = {admin.info.backend_pid, observer.info.backend_pid}
                (start_lsn,) = admin.execute("SELECT pg_current_wal_lsn()").fetchone()
                cpu_before = postgres_cpu_seconds(postmaster, observers)
                sampler = threading.Thread(target=sample_backends, args=(observer, stop, states))
                sampler.start()
                go.wait(timeout=60)
                spans = collect(results, processes)
                stop.set()
                sampler.join()
                cpu_after = postgres_cpu_seconds(postmaster, observers)  # the writers' backends still run
                (wal,) = admin.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start_lsn,)).fetchone()
        finally:
            stop.set()
            done.set()
            for process in processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
        sampled = sum(states.values())
        return CeilingRow(
            hnsw=hnsw, writers=writers, docs=docs,
            seconds=max(end for _, end, _ in spans) - min(start for start, _, _ in spans),
            wal_bytes=int(wal), postgres_cpu_s=cpu_after - cpu_before, writers_cpu_s=sum(cpu for _, _, cpu in spans),
            backend_states={state: count / sampled for state, count in states.items()} if sampled else {},
            server=server_description(admin))
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def prepare_template(settings: Settings, admin: psycopg.Connection, url: str) -> None:
    """A database with Segue's schema and the two models registered: 1, 384-d (old) and 2, 768-d (new)."""
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    dsn = conninfo.make_conninfo(url, dbname=TEMPLATE)
    upgrades.upgrade(settings, dsn)
    with connections.connect(settings, dsn) as conn:
        old = register_model(conn, "old", "/bench/old", profile=profile("old", OLD_DIM))
        new = register_model(conn, "new", "/bench/new", profile=profile("new", NEW_DIM))
    if (old.version, new.version) != (1, 2):
        raise RuntimeError(f"the models registered as versions {old.version} and {new.version}, not 1 and 2")


def measure(docs: int, writers: Sequence[int] = WRITERS, *, batch: int = GPU_BATCH_SIZE) -> list[CeilingRow]:
    """Dual-write ``docs`` documents per configuration, without and with the old model's HNSW index, at each number
    of ``writers``, on embedded PostgreSQL of its own; one row per configuration."""
    data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-write-ceiling-"))
    settings = Settings(data_dir=data_dir)
    url = services.database_url(settings)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET autovacuum = off")
            admin.execute("SELECT pg_reload_conf()")
            prepare_template(settings, admin, url)
            return [run_configuration(settings, admin, url, hnsw, count, docs, batch)
                    for hnsw in (False, True) for count in writers]
    finally:
        services.down(settings)
        shutil.rmtree(data_dir, ignore_errors=True)


def markdown_table(rows: Sequence[CeilingRow]) -> str:
    """The rows as a Markdown table."""
    head = ("| configuration | docs | s | rows/s | WAL MiB/s | WAL KiB/row | PostgreSQL CPU | writers CPU "
            "| writers' backends |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.configuration} | {r.docs:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} "
                     f"| {r.wal_mib_per_s:.1f} | {r.wal_kib_per_row:.1f} | {r.postgres_cpu_s / r.seconds:.2f} "
                     f"| {r.writers_cpu_s / r.seconds:.2f} | {r.busiest_states()} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20_000, help="documents written in each configuration")
    parser.add_argument("--writers", type=int, nargs="+", default=list(WRITERS), help="writer connections to try")
    parser.add_argument("--batch", type=int, default=GPU_BATCH_SIZE, help="documents a transaction")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows = measure(args.docs, args.writers, batch=args.batch)
    print(markdown_table(rows))
    print(f"\n{rows[0].server if rows else ''}")
    print(f"batches of {args.batch}; a 384-d and a 768-d vector a document; CPU in cores busy over the run, of "
          f"{os.cpu_count()} here; backends' states: shares of {SAMPLE_INTERVAL_S * 1000:.0f} ms samples "
          f"(idle: waiting for the writer between transactions); {time.perf_counter() - started:.0f} s in all; "
          f"load average {load:.2f} at the start")


if __name__ == "__main__":
    main()
