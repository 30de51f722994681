"""``segue import`` throughput: rows a second adopted from a local pgvector table.

    python benchmarks/bench_import.py                  # 200,000 rows of 384-d vectors (goal: >= 20,000 rows/s)
    python benchmarks/bench_import.py --rows 50000 --dim 1536 --page-size 10000

Fills a table ``items(id bigint, content text, updated_at timestamptz, embedding vector(DIM))``
in a second database of embedded services of its own (random unit vectors, 150-character
texts), then imports it twice with ``run_import``: once into an empty Segue (every row written,
vectors adopted) and once more (every row read, none newer, nothing written). Prints rows/s of
each, and the seconds spent copying the source out, against the end-to-end time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from segue.control.importer import Source, run_import
from segue.devtools import services
from segue.settings import Settings
from segue.storage import connections, upgrades


def fill(url: str, rows: int, dim: int) -> None:
    """The source table, written with binary COPY."""
    rng = np.random.default_rng(7)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(f"CREATE TABLE items (id bigint PRIMARY KEY, content text, updated_at timestamptz NOT NULL,"
                     f" embedding vector({dim}))")
        with conn.cursor().copy("COPY items FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "timestamptz", "vector"])
            for start in range(0, rows, 10_000):
                block = rng.standard_normal((min(10_000, rows - start), dim), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                for offset, vector in enumerate(block):
                    n = start + offset
                    copy.write_row([n, f"document {n}: " + "lorem ipsum dolor sit amet " * 5, _time(n), vector])
        conn.execute("VACUUM ANALYZE items")
        conn.execute("CHECKPOINT")  # the import starts with the fill's writes flushed


def _time(n: int):
    from datetime import datetime, timedelta, timezone

    return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=n)


def copy_out_seconds(url: str, page_size: int) -> float:
    """The floor: the whole table copied out in binary, keyset page by page, and thrown away."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        after = -1
        while True:
            rows = 0
            with conn.cursor().copy(f"COPY (SELECT id, content, updated_at, embedding FROM items WHERE id > {after}"
                                    f" ORDER BY id LIMIT {page_size}) TO STDOUT (FORMAT BINARY)") as copy:
                for _ in copy:
                    pass
            (rows, last) = conn.execute(f"SELECT count(*), max(id) FROM (SELECT id FROM items WHERE id > {after}"
                                        f" ORDER BY id LIMIT {page_size}) p").fetchone()
            if rows < page_size:
                return time.perf_counter() - started
            after = last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--page-size", type=int, default=5000)
    args = parser.parse_args()
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="segue-bench-import-")), embedded_kafka_port=29093)
    url = services.database_url(settings)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE legacy")
        legacy = url.replace("/postgres?", "/legacy?")
        started = time.perf_counter()
        fill(legacy, args.rows, args.dim)
        print(f"source: {args.rows:,} rows of {args.dim}-d vectors written in {time.perf_counter() - started:.0f} s")
        upgrades.upgrade(settings, url)
        source = Source(url=legacy, table="items", id_column="id", text_columns=("content",),
                        version_column="updated_at", vector_column="embedding")
        with connections.connect(settings, url) as conn:
            for run in ("into an empty Segue", "again (nothing newer)"):
                report = run_import(conn, source, model="legacy", page_size=args.page_size, rate=None, console=None)
                print(f"import {run}: {report.read:,} rows read, {report.written:,} written in {report.seconds:.1f} s"
                      f" = {report.read / report.seconds:,.0f} rows/s")
        floor = copy_out_seconds(legacy, args.page_size)
        print(f"copying the source out alone: {floor:.1f} s = {args.rows / floor:,.0f} rows/s")
    finally:
        services.down(settings)


if __name__ == "__main__":
    main()
