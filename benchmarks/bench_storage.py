"""Benchmark: what filling a new model's vector column costs in time, WAL and bloat.

    python benchmarks/bench_storage.py                              # 100,000 documents (4-6 min on 2 cores)
    python benchmarks/bench_storage.py --docs 20000 --old-index     # with the old model's HNSW index

Writes N SciFact abstracts (the bundled corpus repeated, each copy numbered) with the 384-d
vector of an old model into a fresh embedded PostgreSQL, through Segue's schema and its store
(``StoreTransaction.upsert_documents`` in batches of 64 documents in shuffled doc_id order, as
workers write a change stream), then VACUUM ANALYZE; with ``--old-index`` the old model's HNSW
index is then built as workers build it (``indexes.build``, default policy). That database is the
template of one database per variant. In each, the variant's fillfactor is set (the table is
rewritten with VACUUM FULL when it differs from the template's), a new 768-d model is registered
with ``register_model`` (``ALTER TABLE … ADD COLUMN``) and its column is filled as workers fill it
in a backfill: in doc_id order, one transaction a batch of ``StoreTransaction.write_vectors``
(COPY into a staging table, then one ``UPDATE``) and its ``embedded`` changelog rows. The vectors
are random unit vectors.

Each fill starts right after a CHECKPOINT, and none happens during it unless the variant spreads
some over it (max_wal_size is raised), so every page it touches is logged whole once per
checkpoint interval it is touched in; the time of those checkpoints is left out of its seconds.
Autovacuum is off, so the dead tuples stay until the plain VACUUM measured after the fill.

Measured per variant: the free space on the pages before the fill (``pgstattuple``), seconds,
WAL bytes (``pg_current_wal_lsn`` before and after) and full-page images (``pg_stat_wal``), the
share of updates that were HOT, the heap's growth a row, the heap, TOAST (with its index), index
and total sizes before and after the fill, the dead tuples left before VACUUM and their bytes,
and the total and free space after a plain VACUUM. Prints one table; asserts nothing.

pgvector lets a vector column take any storage mode. Its type's own, EXTERNAL, keeps vectors out
of line and uncompressed once a row passes 2 KB. MAIN (measured) keeps them in the row; PLAIN
lays a 768-d row out as MAIN does and cannot store a row wider than a page (a vector past about
1,950 dimensions), so it is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from segue.control import indexes
from segue.control.registry import register_model
from segue.devtools import services
from segue.devtools.corpus import scifact_documents
from segue.schemas.changelog import Action, Origin
from segue.schemas.events import SourcePosition
from segue.settings import Settings
from segue.spec import ModelProfile, ModelSpec
from segue.storage import connections, model_columns, upgrades
from segue.storage.changelog import ChangelogRow
from segue.storage.documents import DocumentRow, Store, VectorRow

OLD_DIM, NEW_DIM = 384, 768
LOAD_BATCH = 64  # SEGUE_BATCH_SIZE
MiB = 2**20


@dataclass(frozen=True)
class Variant:
    """One way of filling the new column."""

    name: str
    fillfactor: int
    storage: str | None = None  # None: pgvector's own (EXTERNAL)
    batch: int = 64  # SEGUE_BATCH_SIZE: the records a worker writes in one transaction
    checkpoints: int = 0  # CHECKPOINTs spread over the fill, as a fill of hours meets them


VARIANTS = [
    Variant("fillfactor 100", 100),
    Variant("fillfactor 100, STORAGE MAIN", 100, storage="MAIN"),
    Variant("fillfactor 90", 90),
    Variant("fillfactor 70 (Segue's)", 70),
    Variant("fillfactor 50", 50),
    Variant("fillfactor 100, batch 512", 100, batch=512),
    Variant("fillfactor 100, 8 checkpoints", 100, checkpoints=8),
    Variant("fillfactor 70, 8 checkpoints", 70, checkpoints=8),
]


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """``rows`` random unit vectors of ``dim`` float32s."""
    block = rng.standard_normal((rows, dim), dtype=np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def profile(name: str, dim: int) -> ModelProfile:
    """A static model's profile: registering it needs no model files."""
    return ModelProfile(provider="static", dim=dim, max_tokens=512, config={"normalize": True},
                        fingerprint=f"fingerprint-{name}")


async def load(settings: Settings, url: str, docs: int, old: ModelSpec) -> None:
    """``docs`` numbered SciFact abstracts with an old-model vector each, through the store."""
    corpus = [d.text for d in scifact_documents()]
    order = list(range(docs))
    random.Random(7).shuffle(order)
    rng = np.random.default_rng(7)
    store = Store(settings, url)
    try:
        for first in range(0, docs, LOAD_BATCH):
            numbers = order[first:first + LOAD_BATCH]
            rows = []
            for n, vector in zip(numbers, unit_vectors(rng, len(numbers), OLD_DIM)):
                body = f"{n}. {corpus[n % len(corpus)]}"
                rows.append(DocumentRow(doc_id=f"doc-{n:08d}", body=body, version=1,
                                        content_sha256=hashlib.sha256(body.encode()).digest(), metadata={},
                                        source=SourcePosition("document-changes", n % 4, n), vectors={1: vector}))
            async with store.transaction() as tx:
                await tx.upsert_documents(rows, [old])
    finally:
        await store.close()


async def fill(settings: Settings, url: str, variant: Variant, hashes: list[tuple[str, bytes]],
               model: ModelSpec) -> float:
    """Write the new model's vectors as a backfill does; the seconds it took, checkpoints left out."""
    rng = np.random.default_rng(11)
    batches = range(0, len(hashes), variant.batch)
    every = -(-len(batches) // (variant.checkpoints + 1))
    store = Store(settings, url)
    try:
        conn = await store.connection()
        elapsed = 0.0
        for n, first in enumerate(batches):
            if variant.checkpoints and n and n % every == 0:
                await conn.execute("CHECKPOINT")
            started = time.perf_counter()
            page = hashes[first:first + variant.batch]
            vectors = unit_vectors(rng, len(page), model.dim)
            async with store.transaction() as tx:
                written = await tx.write_vectors(model, [VectorRow(d, h, v) for (d, h), v in zip(page, vectors)])
                await tx.log([ChangelogRow(d, model.version, Action.EMBEDDED, Origin.BACKFILL, doc_version=1)
                              for d in sorted(written)])
            elapsed += time.perf_counter() - started
        await conn.execute("SELECT pg_stat_force_next_flush()")  # flushed before the statement returns
        return elapsed
    finally:
        await store.close()


def sizes(conn: psycopg.Connection) -> dict[str, float]:
    """MiB of the documents heap, its TOAST table (with the TOAST index), its indexes, and in all."""
    heap, toast, index, total = conn.execute(
        "SELECT pg_relation_size(c.oid), coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),"
        " pg_indexes_size(c.oid), pg_total_relation_size(c.oid) FROM pg_class c WHERE c.oid = 'documents'::regclass"
    ).fetchone()
    return {"heap": heap / MiB, "toast": toast / MiB, "indexes": index / MiB, "total": total / MiB}


def heap_tuples(conn: psycopg.Connection) -> tuple[int, float, float, float]:
    """Dead tuples of the documents heap, their MiB, the live tuples' mean bytes, the free space in %."""
    count, dead, live, tuples, free = conn.execute(
        "SELECT dead_tuple_count, dead_tuple_len, tuple_len, tuple_count, free_percent FROM pgstattuple('documents')"
    ).fetchone()
    return count, dead / MiB, live / max(tuples, 1), free


def fillfactor(conn: psycopg.Connection) -> int:
    """The documents table's fillfactor."""
    (value,) = conn.execute("SELECT coalesce((SELECT option_value FROM pg_options_to_table(reloptions)"
                            " WHERE option_name = 'fillfactor'), '100')::int FROM pg_class"
                            " WHERE oid = 'documents'::regclass").fetchone()
    return value


def run_variant(settings: Settings, admin: psycopg.Connection, base_url: str, variant: Variant, index: int) -> dict:
    """Copy the template, apply the variant, fill the new column; the figures of the table."""
    name = f"variant{index}"
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE base STRATEGY FILE_COPY").format(sql.Identifier(name)))
    url = base_url.replace("/base?", f"/{name}?")
    try:
        with connections.connect(settings, url) as conn:
            if fillfactor(conn) != variant.fillfactor:  # a fillfactor applies to the pages written after it
                conn.execute(sql.SQL("ALTER TABLE documents SET (fillfactor = {})").format(
                    sql.Literal(variant.fillfactor)))
                conn.execute("VACUUM (FULL, ANALYZE) documents")
            new = register_model(conn, "new", "/bench/new", profile=profile("new", NEW_DIM))
            if variant.storage:
                conn.execute(sql.SQL("ALTER TABLE documents ALTER COLUMN {} SET STORAGE {}").format(
                    model_columns.vector_column(new.version), sql.SQL(variant.storage)))
            hashes = conn.execute("SELECT doc_id, content_sha256 FROM documents ORDER BY doc_id").fetchall()
            before = sizes(conn)
            room = heap_tuples(conn)[3]
            conn.execute("CHECKPOINT")
            conn.execute("SELECT pg_stat_reset_shared('wal')")
            (start,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            seconds = asyncio.run(fill(settings, url, variant, hashes, new))
            (wal,) = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,)).fetchone()
            (fpi,) = conn.execute("SELECT wal_fpi FROM pg_stat_wal").fetchone()
            updated, hot = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                                        " WHERE relname = 'documents'").fetchone()
            filled = sizes(conn)
            dead_tuples, dead_mib, _, _ = heap_tuples(conn)
            conn.execute("VACUUM documents")
            vacuumed = sizes(conn)
            free_after = heap_tuples(conn)[3]
    finally:
        admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    return {"variant": variant, "rows": len(hashes), "room": room, "seconds": seconds, "wal": float(wal), "fpi": fpi,
            "hot": hot / max(updated, 1), "before": before, "filled": filled, "dead": dead_tuples,
            "dead_mib": dead_mib, "vacuumed": vacuumed, "free_after": free_after}


def table(results: list[dict]) -> list[str]:
    """The figures, one line a variant."""
    head = (f"{'variant':<31} {'room':>5} {'s':>6} {'WAL MiB':>8} {'WAL/row':>8} {'FPIs':>7} {'HOT':>6} "
            f"{'heap +/row':>10} {'heap MiB':>10} {'toast MiB':>10} {'idx MiB':>8} {'total MiB':>10} "
            f"{'dead':>7} {'dead MiB':>8} {'vacuumed':>8} {'free':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        rows, before, filled = r["rows"], r["before"], r["filled"]

        def grew(part: str) -> str:
            return f"{before[part]:.0f}→{filled[part]:.0f}"

        lines.append(
            f"{r['variant'].name:<31} {r['room']:>4.0f}% {r['seconds']:>6.1f} {r['wal'] / MiB:>8.0f} "
            f"{r['wal'] / rows:>8,.0f} {r['fpi']:>7,} {100 * r['hot']:>5.1f}% "
            f"{(filled['heap'] - before['heap']) * MiB / rows:>10,.0f} {grew('heap'):>10} {grew('toast'):>10} "
            f"{grew('indexes'):>8} {grew('total'):>10} {r['dead']:>7,} {r['dead_mib']:>8.1f} "
            f"{r['vacuumed']['total']:>8.0f} {r['free_after']:>4.0f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100_000, help="documents written and filled")
    parser.add_argument("--old-index", action="store_true", help="build the old model's HNSW index first")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="segue-bench-storage-"))
    settings = Settings(data_dir=data_dir)
    url = services.database_url(settings)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            for setting, value in (("autovacuum", "off"), ("max_wal_size", "16GB"), ("checkpoint_timeout", "1h")):
                admin.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(setting), sql.Literal(value)))
            admin.execute("SELECT pg_reload_conf()")
            admin.execute("CREATE DATABASE base")
            base_url = url.replace("/postgres?", "/base?")
            upgrades.upgrade(settings, base_url)
            started = time.perf_counter()
            with connections.connect(settings, base_url) as conn:
                conn.execute("CREATE EXTENSION pgstattuple")
                old = register_model(conn, "old", "/bench/old", profile=profile("old", OLD_DIM))
                asyncio.run(load(settings, base_url, args.docs, old))
                conn.execute("VACUUM ANALYZE documents")
                if args.old_index:
                    indexes.build(conn, old.version, indexes.IndexPolicy.from_settings(settings))
                loaded, (_, _, tuple_bytes, free) = sizes(conn), heap_tuples(conn)
                print(f"loaded {args.docs:,} documents in {time.perf_counter() - started:.0f} s: {OLD_DIM}-d vectors, "
                      f"{loaded['total']:.0f} MiB, heap tuples of {tuple_bytes:,.0f} bytes on average, "
                      f"pages {free:.0f}% free at fillfactor {fillfactor(conn)}"
                      f"{', the old HNSW index built' if args.old_index else ''}; filling a {NEW_DIM}-d column:")
            results = [run_variant(settings, admin, base_url, v, n) for n, v in enumerate(VARIANTS)]
        print("\n".join(table(results)))
        print("room: free space on the pages before the fill; WAL/row and heap +/row in bytes; FPIs: full-page "
              "images; HOT: updates that stayed on their page; before→after the fill; dead: dead tuples left "
              "before VACUUM; vacuumed: total MiB after a plain VACUUM, and the heap's free space")
    finally:
        services.down(settings)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
