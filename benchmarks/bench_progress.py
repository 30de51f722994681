"""Benchmark: migration_progress latency against a large documents table.

Fills a fresh embedded PostgreSQL with N documents (default 1,000,000) carrying
vectors for two registered models in mixed states (current, stale, missing) and as
many changelog rows spread over 24 hours, all through the normal triggers, then times ``SELECT * FROM migration_progress`` and checks it
against a direct count. Prints the figures; asserts nothing about speed.

    python benchmarks/bench_progress.py [--docs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from segue.control.registry import register_model
from segue.devtools import services
from segue.settings import Settings
from segue.spec import ModelProfile
from segue.storage import connections, upgrades


@dataclass(frozen=True)
class ProgressTiming:
    """``migration_progress`` latency in milliseconds, and whether it equals a direct count."""

    median_ms: float
    max_ms: float
    exact: bool


def measure(docs: int) -> ProgressTiming:
    """Fill a fresh database with ``docs`` documents and changelog rows, then time the progress view."""
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="segue-bench-")))
    url = services.database_url(settings)
    upgrades.upgrade(settings, url)
    try:
        with connections.connect(settings, url) as conn:
            for name, dim in (("old", 16), ("new", 32)):
                register_model(conn, name, f"/bench/{name}", profile=ModelProfile(
                    provider="static", dim=dim, max_tokens=512, config={"normalize": True},
                    fingerprint=f"fingerprint-{name}"))
            started = time.perf_counter()
            step = 100_000
            for first in range(0, docs, step):
                conn.execute(
                    "INSERT INTO documents (doc_id, body, version, content_sha256, embedding_v1, embedding_v1_sha256,"
                    " embedding_v2, embedding_v2_sha256)"
                    " SELECT 'doc-' || i, 'body ' || i, 1, sha256(('body ' || i)::bytea),"
                    "  array_fill(0.25, ARRAY[16])::vector, sha256(('body ' || i)::bytea),"
                    "  CASE WHEN i %% 3 = 0 THEN NULL ELSE array_fill(0.125, ARRAY[32])::vector END,"
                    "  CASE WHEN i %% 3 = 0 THEN NULL WHEN i %% 3 = 1 THEN sha256(('body ' || i)::bytea)"
                    "       ELSE sha256('stale'::bytea) END"
                    " FROM generate_series(%s, %s) AS i",
                    (first, min(first + step, docs) - 1),
                )
            print(f"inserted {docs:,} documents through the counter triggers in {time.perf_counter() - started:.1f}s")
            started = time.perf_counter()
            conn.execute(
                "INSERT INTO migration_changelog (at, doc_id, model_version, action, origin)"
                " SELECT now() - (i %% 86400) * interval '1 second', 'doc-' || i, 1 + i %% 2,"
                "  (ARRAY['embedded', 'unchanged', 'superseded', 'failed'])[1 + i %% 4],"
                "  (ARRAY['change', 'read_miss', 'backfill'])[1 + i %% 3]"
                " FROM generate_series(1, %s) AS i",
                (docs,),
            )
            (buckets,) = conn.execute("SELECT count(*) FROM activity_counters").fetchone()
            print(f"inserted {docs:,} changelog rows over 24 h ({buckets:,} minute buckets) "
                  f"in {time.perf_counter() - started:.1f}s")
            timings = []
            for _ in range(50):
                t = time.perf_counter()
                conn.execute("SELECT * FROM migration_progress").fetchall()
                timings.append((time.perf_counter() - t) * 1000)
            print(f"migration_progress over {docs:,} documents: median {statistics.median(timings):.2f} ms, "
                  f"max {max(timings):.2f} ms (50 runs)")
            t = time.perf_counter()
            direct = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE embedding_v2_sha256 = content_sha256),"
                " count(*) FILTER (WHERE embedding_v2_sha256 <> content_sha256) FROM documents").fetchone()
            print(f"the same figures by direct count: {(time.perf_counter() - t) * 1000:.0f} ms")
            progress = conn.execute("SELECT total_documents, current_vectors, stale_vectors FROM migration_progress"
                                    " WHERE model = 'new'").fetchone()
            print(f"progress {progress} == direct {direct}: {tuple(progress) == tuple(direct)}")
            return ProgressTiming(statistics.median(timings), max(timings), tuple(progress) == tuple(direct))
    finally:
        services.down(settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1_000_000)
    measure(parser.parse_args().docs)


if __name__ == "__main__":
    main()
