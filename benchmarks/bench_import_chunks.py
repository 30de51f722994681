"""``segue import`` of a chunk table: rows (chunks) a second adopted from a local pgvector table.

    python benchmarks/bench_import_chunks.py          # 40,000 documents x 5 chunks of 384-d (goal: >= 20,000 rows/s)
    python benchmarks/bench_import_chunks.py --documents 10000 --chunks 8 --dim 768 --page-size 10000

Fills a table ``passages(doc_id bigint, chunk_no int, passage text, updated_at timestamptz,
embedding vector(DIM))`` in a second database of embedded services of its own (random unit
vectors, 100-character passages), then imports it twice with ``run_import``
(``--chunk-column chunk_no --chunk-text-column passage``): once into an empty Segue (every
document rebuilt from its chunks, every chunk vector adopted into ``chunks_vN``, every
document's vector the normalised mean) and once more (every row read, none newer, nothing
written). Prints rows/s of each, and the seconds spent copying the source out, against the
end-to-end time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from segue.control.importer import Source, run_import
from segue.devtools import services
from segue.settings import Settings
from segue.storage import connections, upgrades


def fill(url: str, documents: int, chunks: int, dim: int) -> None:
    """The source table, written with binary COPY: ``chunks`` rows per document, in id order."""
    rng = np.random.default_rng(7)
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(sql.SQL("CREATE TABLE passages (doc_id bigint NOT NULL, chunk_no integer NOT NULL, passage text,"
                             " updated_at timestamptz NOT NULL, embedding vector({}), PRIMARY KEY (doc_id, chunk_no))")
                     .format(sql.Literal(dim)))
        with conn.cursor().copy("COPY passages FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int4", "text", "timestamptz", "vector"])
            step = max(1, 10_000 // chunks)
            for start in range(0, documents, step):
                count = min(step, documents - start)
                block = rng.standard_normal((count * chunks, dim), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                for offset in range(count):
                    n = start + offset
                    for c in range(chunks):
                        copy.write_row([n, c, f"document {n}, passage {c}: " + "lorem ipsum dolor sit amet " * 3,
                                        base + timedelta(seconds=n), block[offset * chunks + c]])
        conn.execute("VACUUM ANALYZE passages")
        conn.execute("CHECKPOINT")  # the import starts with the fill's writes flushed


def copy_out_seconds(url: str, page_size: int) -> float:
    """The floor: the whole table copied out in binary, keyset page by page of document ids, and thrown away."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        after = -1
        while True:
            last = conn.execute("SELECT max(doc_id) FROM (SELECT doc_id FROM passages WHERE doc_id > %s"
                                " ORDER BY doc_id LIMIT %s) p", (after, page_size)).fetchone()[0]
            if last is None:
                return time.perf_counter() - started
            with conn.cursor().copy(sql.SQL(
                    "COPY (SELECT doc_id, chunk_no, passage, updated_at, embedding FROM passages"
                    " WHERE doc_id > {} AND doc_id <= {} ORDER BY doc_id, chunk_no) TO STDOUT (FORMAT BINARY)"
            ).format(sql.Literal(after), sql.Literal(last))) as copy:
                for _ in copy:
                    pass
            after = last


@dataclass(frozen=True)
class ImportRates:
    """Rows a second of the first import, of a second one with nothing newer, and of copying the source out alone."""

    rows: int
    first: float
    again: float
    copy_out: float


def measure(documents: int = 40_000, chunks: int = 5, dim: int = 384, page_size: int = 5000, *,
            say=print) -> ImportRates:
    """Fill the source, import it twice, copy it out alone; the rates (``say`` prints as it goes)."""
    rows = documents * chunks
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="segue-bench-import-chunks-")),
                        embedded_kafka_port=29094)
    url = services.database_url(settings)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE legacy")
        legacy = url.replace("/postgres?", "/legacy?")
        started = time.perf_counter()
        fill(legacy, documents, chunks, dim)
        say(f"source: {rows:,} chunks ({documents:,} documents x {chunks}) of {dim}-d vectors"
            f" written in {time.perf_counter() - started:.0f} s")
        upgrades.upgrade(settings, url)
        source = Source(url=legacy, table="passages", id_column="doc_id", chunk_column="chunk_no",
                        chunk_text_column="passage", version_column="updated_at", vector_column="embedding")
        rates = []
        with connections.connect(settings, url) as conn:
            for run in ("into an empty Segue", "again (nothing newer)"):
                report = run_import(conn, source, model="legacy-chunks", page_size=page_size, rate=None,
                                    console=None)
                rates.append(report.read / report.seconds)
                say(f"import {run}: {report.read:,} rows read, {report.written:,} documents written from"
                    f" {report.chunks:,} chunks in {report.seconds:.1f} s = {rates[-1]:,.0f} rows/s")
        floor = copy_out_seconds(legacy, page_size)
        say(f"copying the source out alone: {floor:.1f} s = {rows / floor:,.0f} rows/s")
        return ImportRates(rows, rates[0], rates[1], rows / floor)
    finally:
        services.down(settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=40_000)
    parser.add_argument("--chunks", type=int, default=5, help="chunks per document")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--page-size", type=int, default=5000)
    args = parser.parse_args()
    measure(args.documents, args.chunks, args.dim, args.page_size)


if __name__ == "__main__":
    main()
