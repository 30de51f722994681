"""Benchmark: the PostgreSQL write ceiling of a migration, in documents and WAL bytes a second.

    python benchmarks/bench_write_ceiling.py                  # 100,000-document corpus, 10,000 written a configuration
    python benchmarks/bench_write_ceiling.py --corpus 20000 --docs 2000 --writers 1 2 --kinds backfill

At GPU speed the embedding is no longer the limit: PostgreSQL is. This measures how fast one
embedded PostgreSQL takes a migration's writes, from an old 384-d model to a new 768-d one,
into a corpus that is already there, and how much WAL they make. Default run: about 5 minutes
on 2 cores (2 of them loading the corpus and building its index; most of the rest, the dual-writes
into the HNSW graph).

The corpus: ``--corpus`` documents (default 100,000; SciFact abstracts, the bundled corpus
repeated, each copy numbered) written before the clock starts with the old model's vector only,
with Segue's ``documents.insert_embedded``, 5,000 documents a transaction, then VACUUM ANALYZE.
They are written in random order (``--corpus-order random``, the default), so the rows sharing a
page are far apart in doc_id order, as in a large corpus the change stream wrote over time; or in
doc_id order (``--corpus-order doc-id``), as a load sorted by doc_id leaves them: a backfill
batch then updates every row of a page in one transaction, and more than half of the new row
versions find no room on it (1,000 documents backfilled into 20,000: 43 % HOT, against 97-99 %
in random order).
That database, holding Segue's schema and both models (1, 384-d, old; 2, 768-d, new), is one
template; a copy of it with the old model's HNSW index built over the whole corpus
(``indexes.build``, the default policy) is the other. Each configuration writes into a fresh
copy of one of them (``CREATE DATABASE … TEMPLATE``), right after a CHECKPOINT, with
autovacuum off, on this embedded server alone (its WAL is all the benchmark's).

Two kinds of writes, each without and with the old model's HNSW index, at each number of
writers:

- **backfill**: the new model's vector written into ``--docs`` existing documents, as
  ``BackfillProcessor`` writes a re-embed: the live and retired models read from the registry,
  the batch's stored state with bodies (``Store.fetch``), then one transaction of
  ``StoreTransaction.write_vectors`` (a binary COPY into a staging table, the rows locked in
  doc_id order, one ``UPDATE`` guarded by the content hash) and the batch's ``embedded``
  changelog rows (``StoreTransaction.log``, origin ``backfill``). The documents are the first
  ``--docs`` in doc_id order (where a backfill starts), each given to a writer at random (as
  the backfill topic's key hash spreads them over partitions), in doc_id order within a writer.
  An update that finds room on its page is HOT: no new entry in any index (the HNSW one
  included); the table's fillfactor (70) leaves that room. The HOT column is the share of the
  ``documents`` updates that were HOT (``pg_stat_user_tables``).
- **dual-write**: ``--docs`` new documents, each with both models' vectors, as
  ``ChangeProcessor._apply`` writes changes during a migration: the live and retired models,
  the batch's stored state (``Store.fetch``), then one transaction of
  ``StoreTransaction.upsert_documents`` and the batch's ``embedded`` changelog rows (one per
  document and model). With the index, each new document is inserted into the corpus's graph.

Each writer is a process with its own connection (a ``Store``, as a worker has), writing its own
share in batches of ``GPU_BATCH_SIZE`` (512, a GPU worker's batch). Vectors are random unit
float32s; the writers build them before the clock starts, so their own work is encoding and
sending the rows.

Measured per configuration: seconds from the start of the first writer to the end of the last,
documents a second, WAL (``pg_current_wal_lsn`` before and after) a second and a document, the
CPU the PostgreSQL processes and the writer processes used (psutil, in cores busy), the HOT
share of the updates, and what the writers' backends were doing, sampled from
``pg_stat_activity`` every 20 ms: on CPU, waiting on an event (``IO:WalSync``,
``LWLock:WALWrite``, ``Client:ClientRead`` while a COPY waits for its data, …), or idle between
transactions (waiting for the writer). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import psycopg
from psycopg import conninfo, sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_storage's helpers

from benchmarks.bench_storage import profile, unit_vectors  # noqa: E402
from segue.agents.worker import GPU_BATCH_SIZE  # noqa: E402
from segue.control import indexes  # noqa: E402
from segue.control.registry import register_model  # noqa: E402
from segue.devtools import services  # noqa: E402
from segue.devtools.corpus import scifact_documents  # noqa: E402
from segue.schemas.changelog import Action, Origin  # noqa: E402
from segue.schemas.events import SourcePosition  # noqa: E402
from segue.settings import Settings  # noqa: E402
from segue.storage import connections, documents, upgrades  # noqa: E402
from segue.storage.changelog import ChangelogRow  # noqa: E402
from segue.storage.documents import DocumentRow, Store, VectorRow  # noqa: E402

OLD_VERSION, NEW_VERSION = 1, 2
OLD_DIM, NEW_DIM = 384, 768
WRITERS = (1, 2, 4)
KINDS = ("backfill", "dual-write")
CORPUS = 100_000
DOCS = 10_000
CORPUS_ORDERS = ("random", "doc-id")  # how the corpus's rows lie on the pages, relative to doc_id order
LOAD_BATCH = 5_000  # documents a transaction while loading the corpus
APPLICATION_NAME = "segue-write-ceiling"  # marks the writers' backends in pg_stat_activity
SAMPLE_INTERVAL_S = 0.02
TEMPLATES = {False: "ceiling_corpus", True: "ceiling_corpus_hnsw"}  # by whether the old column is indexed
PARTITIONS = 4  # SEGUE_TOPIC_PARTITIONS: the source positions the rows carry
MiB = 2**20
SERVER_SETTINGS = ("shared_buffers", "wal_buffers", "synchronous_commit", "fsync", "full_page_writes",
                   "wal_compression", "max_wal_size")
STATS_WAIT_S = 30.0  # for the writers' table statistics to arrive once their backends exit

Batch = tuple[list[DocumentRow], list[ChangelogRow]] | list[tuple[str, np.ndarray]]


@dataclass(frozen=True)
class CeilingRow:
    """One configuration: ``docs`` documents written by ``writers`` connections (``kind``: ``backfill`` or
    ``dual-write``) into a corpus of ``corpus`` documents, with or without the old model's HNSW index."""

    kind: str
    hnsw: bool
    writers: int
    docs: int
    seconds: float
    wal_bytes: int
    postgres_cpu_s: float  # every PostgreSQL process but the benchmark's own observing connections
    writers_cpu_s: float  # the writer processes
    updates: int = 0  # of the documents table, during the run
    hot_updates: int = 0  # of which HOT
    corpus: int = 0
    backend_states: dict[str, float] = field(default_factory=dict)  # share of the writers' backends' samples
    server: str = ""  # the PostgreSQL version and the settings that shape its writes
    setup: str = ""  # how the corpus was loaded and indexed

    @property
    def configuration(self) -> str:
        """The configuration in words."""
        write = "backfill 768-d" if self.kind == "backfill" else "dual-write 384-d + 768-d"
        index = "HNSW on the 384-d column" if self.hnsw else "no HNSW index"
        return f"{write}, {index}, {self.writers} writer{'s' if self.writers > 1 else ''}"

    @property
    def rows_per_s(self) -> float:
        """Documents written a second."""
        return self.docs / self.seconds

    @property
    def wal_mib_per_s(self) -> float:
        """WAL MiB a second."""
        return self.wal_bytes / MiB / self.seconds

    @property
    def wal_kib_per_row(self) -> float:
        """WAL KiB a document."""
        return self.wal_bytes / 1024 / self.docs

    @property
    def hot_share(self) -> float | None:
        """The share of the documents table's updates that were HOT; None without updates."""
        return self.hot_updates / self.updates if self.updates else None

    def busiest_states(self, count: int = 3) -> str:
        """The writers' backends' most frequent states, with their shares of the samples."""
        top = sorted(self.backend_states.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{state} {100 * share:.0f}%" for state, share in top)


def doc_id(number: int) -> str:
    """The id of document ``number`` (zero-padded: doc_id order is number order)."""
    return f"doc-{number:08d}"


def tokens(body: str) -> int:
    """The tokens a changelog row records for ``body`` (about four characters a token, at most 512)."""
    return min(512, len(body) // 4)


def body(number: int, texts: Sequence[str]) -> str:
    """The body of document ``number``: one of ``texts``, numbered."""
    return f"{number}. {texts[number % len(texts)]}"


def document_row(number: int, texts: Sequence[str], vectors: dict[int, np.ndarray]) -> DocumentRow:
    """Document ``number`` at version 1, as a change brings it, with ``vectors`` by model version."""
    text = body(number, texts)
    return DocumentRow(doc_id=doc_id(number), body=text, version=1,
                       content_sha256=hashlib.sha256(text.encode()).digest(), metadata={},
                       source=SourcePosition("document-changes", number % PARTITIONS, number), vectors=vectors)


def dual_write_batches(numbers: Sequence[int], batch: int, seed: int) -> list[Batch]:
    """The new documents ``numbers`` as the pipeline hands them to the store: rows with both models' vectors and
    their ``embedded`` changelog rows, ``batch`` documents at a time."""
    texts = [d.text for d in scifact_documents()]
    rng = np.random.default_rng(seed)
    batches: list[Batch] = []
    for first in range(0, len(numbers), batch):
        chosen = numbers[first:first + batch]
        rows, changelog = [], []
        olds, news = unit_vectors(rng, len(chosen), OLD_DIM), unit_vectors(rng, len(chosen), NEW_DIM)
        for n, old, new in zip(chosen, olds, news):
            row = document_row(n, texts, {OLD_VERSION: old, NEW_VERSION: new})
            rows.append(row)
            changelog += [ChangelogRow(row.doc_id, version, Action.EMBEDDED, Origin.CHANGE, doc_version=1,
                                       latency_ms=50.0, tokens_used=tokens(row.body), tokens_total=tokens(row.body))
                          for version in (OLD_VERSION, NEW_VERSION)]
        batches.append((rows, changelog))
    return batches


def backfill_batches(numbers: Sequence[int], batch: int, seed: int) -> list[Batch]:
    """The stored documents ``numbers`` with the new model's vector each, ``batch`` documents at a time."""
    rng = np.random.default_rng(seed)
    batches: list[Batch] = []
    for first in range(0, len(numbers), batch):
        chosen = numbers[first:first + batch]
        batches.append(list(zip((doc_id(n) for n in chosen), unit_vectors(rng, len(chosen), NEW_DIM))))
    return batches


async def write_dual(store: Store, batches: Sequence[Batch]) -> None:
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


async def write_backfill(store: Store, batches: Sequence[Batch]) -> None:
    """Send each batch as ``BackfillProcessor`` does: registry, stored state with bodies, then one transaction of
    the new model's vectors where the content is unchanged, and the batch's ``embedded`` changelog rows."""
    for vectors in batches:
        model = next(m for m in await store.live_models() if m.version == NEW_VERSION)
        await store.retired_models()
        stored = await store.fetch(sorted(d for d, _ in vectors), [model], with_body=True)
        todo = [(stored[d], v) for d, v in vectors if stored[d].model_sha256[model.version] != stored[d].content_sha256]
        async with store.transaction() as tx:
            written = await tx.write_vectors(model, [VectorRow(s.doc_id, s.content_sha256, v) for s, v in todo])
            await tx.log([ChangelogRow(s.doc_id, model.version, Action.EMBEDDED, Origin.BACKFILL,
                                       doc_version=s.version, event_id=f"backfill-{model.version}", latency_ms=50.0,
                                       tokens_used=tokens(s.body), tokens_total=tokens(s.body)) for s, _ in todo])
        if len(written) != len(vectors):
            raise RuntimeError(f"{len(vectors) - len(written)} of {len(vectors)} vectors were not written")


BUILDERS = {"backfill": backfill_batches, "dual-write": dual_write_batches}
WRITES = {"backfill": write_backfill, "dual-write": write_dual}


def run_writer(settings: Settings, dsn: str, kind: str, numbers: list[int], batch: int, seed: int, ready, go,
               results, done) -> None:
    """One writer process: build its batches, connect, wait for the start, write, report (start, end, CPU
    seconds), and keep the connection until ``done`` (its backend's CPU is read meanwhile)."""
    batches = BUILDERS[kind](numbers, batch, seed)

    async def write() -> None:
        store = Store(settings, dsn)
        try:
            await store.connection()
            ready.wait()
            go.wait()
            cpu, started = time.process_time(), time.monotonic()
            await WRITES[kind](store, batches)
            results.put((started, time.monotonic(), time.process_time() - cpu))
            done.wait()
        finally:
            await store.close()

    asyncio.run(write())


def shares(kind: str, corpus: int, docs: int, writers: int) -> list[list[int]]:
    """The document numbers each writer writes: for a backfill the first ``docs`` of the corpus, each given to a
    writer at random and in doc_id order within it; for dual-writes ``docs`` new ones, in random order."""
    rng = np.random.default_rng(writers)
    if kind == "backfill":
        owners = rng.integers(writers, size=docs)
        return [np.flatnonzero(owners == w).tolist() for w in range(writers)]
    order = (corpus + rng.permutation(docs)).tolist()
    return [order[w::writers] for w in range(writers)]


def postgres_cpu_seconds(postmaster: int, excluded: set[int]) -> float:
    """CPU seconds used so far by the children of ``postmaster`` (the server's processes), but ``excluded``."""
    total = 0.0
    for child in psutil.Process(postmaster).children():
        if child.pid not in excluded:
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
    return total


def server_description(conn: psycopg.Connection) -> str:
    """The server's version and the settings that shape its writes, in one line."""
    (version,) = conn.execute("SHOW server_version").fetchone()
    shown = [f"{name} {conn.execute(sql.SQL('SHOW {}').format(sql.Identifier(name))).fetchone()[0]}"
             for name in SERVER_SETTINGS]
    return f"PostgreSQL {version}: " + ", ".join(shown)


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


def table_writes(conn: psycopg.Connection) -> tuple[int, int, int]:
    """The documents table's (inserted, updated, HOT-updated) rows so far, as the statistics have them."""
    return conn.execute("SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                        " WHERE relid = 'documents'::regclass").fetchone()


def writes_since(conn: psycopg.Connection, before: tuple[int, int, int], rows: int) -> tuple[int, int, int]:
    """The documents table's (inserted, updated, HOT-updated) rows since ``before``, once ``rows`` rows were inserted
    or updated (the statistics arrive as the writers' backends exit); raises after ``STATS_WAIT_S``."""
    deadline = time.monotonic() + STATS_WAIT_S
    while True:
        inserted, updated, hot = (now - then for now, then in zip(table_writes(conn), before))
        if inserted + updated >= rows:
            return inserted, updated, hot
        if time.monotonic() > deadline:
            raise RuntimeError(f"the statistics show {inserted + updated} of {rows} rows written")
        time.sleep(0.1)


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


def run_configuration(settings: Settings, admin: psycopg.Connection, url: str, kind: str, hnsw: bool, writers: int,
                      corpus: int, docs: int, batch: int) -> CeilingRow:
    """Copy the template into a fresh database and time ``writers`` writing ``docs`` documents of ``kind``."""
    database = f"ceiling_{kind.replace('-', '_')}_{'hnsw' if hnsw else 'plain'}_{writers}"
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
        sql.Identifier(database), sql.Identifier(TEMPLATES[hnsw])))
    try:
        dsn = conninfo.make_conninfo(url, dbname=database)
        writer_dsn = conninfo.make_conninfo(dsn, application_name=APPLICATION_NAME)
        context = multiprocessing.get_context("spawn")  # no connection of this process is inherited
        ready, go, done, results = (context.Barrier(writers + 1), context.Barrier(writers + 1), context.Event(),
                                    context.Queue())
        processes = [context.Process(target=run_writer, args=(settings, writer_dsn, kind, share, batch, w, ready, go,
                                                              results, done))
                     for w, share in enumerate(shares(kind, corpus, docs, writers))]
        states: Counter[str] = Counter()
        stop = threading.Event()
        for process in processes:
            process.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as observer:
                ready.wait(timeout=600)
                admin.execute("CHECKPOINT")
                postmaster = psutil.Process(admin.info.backend_pid).ppid()
                observers = {admin.info.backend_pid, observer.info.backend_pid}
                writes_before = table_writes(observer)
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
        with psycopg.connect(dsn, autocommit=True) as observer:
            _, updated, hot = writes_since(observer, writes_before, docs)
        sampled = sum(states.values())
        return CeilingRow(
            kind=kind, hnsw=hnsw, writers=writers, docs=docs,
            seconds=max(end for _, end, _ in spans) - min(start for start, _, _ in spans),
            wal_bytes=int(wal), postgres_cpu_s=cpu_after - cpu_before, writers_cpu_s=sum(cpu for _, _, cpu in spans),
            updates=updated, hot_updates=hot, corpus=corpus,
            backend_states={state: count / sampled for state, count in states.items()} if sampled else {},
            server=server_description(admin))
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def load_corpus(settings: Settings, dsn: str, corpus: int, order: str) -> None:
    """Insert documents 0 … ``corpus`` − 1 with the old model's vector only (``documents.insert_embedded``,
    ``LOAD_BATCH`` a transaction), in the given ``order`` of ``CORPUS_ORDERS``: it is the order of the rows on the
    pages."""
    texts = [d.text for d in scifact_documents()]
    rng = np.random.default_rng(corpus)
    numbers = rng.permutation(corpus).tolist() if order == "random" else list(range(corpus))
    with connections.connect(settings, dsn) as conn:
        for first in range(0, corpus, LOAD_BATCH):
            chosen = numbers[first:first + LOAD_BATCH]
            documents.insert_embedded(conn, [(doc_id(n), body(n, texts)) for n in chosen],
                                      {OLD_VERSION: unit_vectors(rng, len(chosen), OLD_DIM)})


def prepare_templates(settings: Settings, admin: psycopg.Connection, url: str, corpus: int, order: str) -> str:
    """The two template databases: Segue's schema, the models 1 (384-d, old) and 2 (768-d, new), ``corpus``
    documents with the old model's vector, stored in ``order``; the second also with the old model's HNSW index.
    Says what it took."""
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATES[False])))
    dsn = conninfo.make_conninfo(url, dbname=TEMPLATES[False])
    upgrades.upgrade(settings, dsn)
    with connections.connect(settings, dsn) as conn:
        old = register_model(conn, "old", "/bench/old", profile=profile("old", OLD_DIM))
        new = register_model(conn, "new", "/bench/new", profile=profile("new", NEW_DIM))
    if (old.version, new.version) != (OLD_VERSION, NEW_VERSION):
        raise RuntimeError(f"the models registered as versions {old.version} and {new.version}, not 1 and 2")
    started = time.perf_counter()
    load_corpus(settings, dsn, corpus, order)
    with connections.connect(settings, dsn) as conn:
        conn.execute("VACUUM (ANALYZE) documents")
    loaded = time.perf_counter() - started
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
        sql.Identifier(TEMPLATES[True]), sql.Identifier(TEMPLATES[False])))
    started = time.perf_counter()
    with connections.connect(settings, conninfo.make_conninfo(url, dbname=TEMPLATES[True])) as conn:
        _, message = indexes.build(conn, OLD_VERSION, indexes.IndexPolicy.from_settings(settings))
    built = time.perf_counter() - started
    return (f"corpus of {corpus:,} documents stored in {order} order, loaded and vacuumed in {loaded:.0f} s; "
            f"{message} in {built:.0f} s")


def measure(docs: int = DOCS, writers: Sequence[int] = WRITERS, *, batch: int = GPU_BATCH_SIZE, corpus: int = CORPUS,
            kinds: Sequence[str] = KINDS, corpus_order: str = "random") -> list[CeilingRow]:
    """Write ``docs`` documents per configuration into a corpus of ``corpus`` stored in ``corpus_order`` (each of
    ``kinds``, without and with the old model's HNSW index, at each number of ``writers``), on embedded PostgreSQL of
    its own; one row per configuration."""
    if "backfill" in kinds and docs > corpus:
        raise ValueError(f"a backfill of {docs:,} documents needs a corpus of as many, not {corpus:,}")
    data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-write-ceiling-"))
    settings = Settings(data_dir=data_dir)
    url = services.database_url(settings)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET autovacuum = off")
            admin.execute("SELECT pg_reload_conf()")
            setup = prepare_templates(settings, admin, url, corpus, corpus_order)
            rows = [run_configuration(settings, admin, url, kind, hnsw, count, corpus, docs, batch)
                    for kind in kinds for hnsw in (False, True) for count in writers]
            return [replace(row, setup=setup) for row in rows]
    finally:
        services.down(settings)
        shutil.rmtree(data_dir, ignore_errors=True)


def markdown_table(rows: Sequence[CeilingRow]) -> str:
    """The rows as a Markdown table."""
    head = ("| configuration | docs | s | rows/s | WAL MiB/s | WAL KiB/row | PostgreSQL CPU | writers CPU | HOT "
            "| writers' backends |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        hot = "–" if r.hot_share is None else f"{100 * r.hot_share:.1f}%"
        lines.append(f"| {r.configuration} | {r.docs:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} "
                     f"| {r.wal_mib_per_s:.1f} | {r.wal_kib_per_row:.1f} | {r.postgres_cpu_s / r.seconds:.2f} "
                     f"| {r.writers_cpu_s / r.seconds:.2f} | {hot} | {r.busiest_states()} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=DOCS, help="documents written in each configuration")
    parser.add_argument("--corpus", type=int, default=CORPUS, help="documents in the corpus before the writes")
    parser.add_argument("--writers", type=int, nargs="+", default=list(WRITERS), help="writer connections to try")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="kinds of writes to measure")
    parser.add_argument("--corpus-order", default="random", choices=CORPUS_ORDERS,
                        help="the order the corpus's rows were written in (and lie on the pages in)")
    parser.add_argument("--batch", type=int, default=GPU_BATCH_SIZE, help="documents a transaction")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows = measure(args.docs, args.writers, batch=args.batch, corpus=args.corpus, kinds=args.kinds,
                   corpus_order=args.corpus_order)
    print(markdown_table(rows))
    print(f"\n{rows[0].server if rows else ''}")
    print(f"{rows[0].setup if rows else ''}")
    print(f"batches of {args.batch}; backfill: a 768-d vector into a stored document; dual-write: a new document "
          f"with a 384-d and a 768-d vector; HOT: share of the documents table's updates; CPU in cores busy over the "
          f"run, of {os.cpu_count()} here; backends' states: shares of {SAMPLE_INTERVAL_S * 1000:.0f} ms samples "
          f"(idle: waiting for the writer between transactions); {time.perf_counter() - started:.0f} s in all; "
          f"load average {load:.2f} at the start")


if __name__ == "__main__":
    main()
