"""The reader in a threaded host service: 8 threads searching at once run in parallel in PostgreSQL.

A corpus of 60,000 synthetic 64-d vectors makes each exact search take long enough to
see the overlap: a sampler counts the reader's connections that are executing at the
same moment. Queries are precomputed vectors (``search_vector``), as a host service
that embeds its own queries sends them; the results are checked against numpy.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest

from segue.client.reader import SegueReader
from segue.control import registry
from segue.spec import ModelProfile
from segue.storage import connections
from tests.harness import Harness

DIM, ROWS, THREADS, SEARCHES = 64, 60_000, 8, 5
FINGERPRINT = "synthetic-64"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("threads"))
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, "synthetic", "/nowhere/synthetic", profile=ModelProfile(
            provider="static", dim=DIM, max_tokens=0, config={}, fingerprint=FINGERPRINT))
        conn.execute(
            "INSERT INTO documents (doc_id, body, version, content_sha256, embedding_v1, embedding_v1_sha256)"
            " SELECT 'doc-' || i, 'body ' || i, 1, sha256(('body ' || i)::bytea),"
            "  (SELECT array_agg(random() - 0.5) FROM generate_series(1, %s) WHERE i > 0)::vector,"
            "  sha256(('body ' || i)::bytea) FROM generate_series(1, %s) i", (DIM, ROWS))
        ids, vectors = zip(*conn.execute("SELECT doc_id, embedding_v1 FROM documents").fetchall())
    matrix = np.stack([v.to_numpy() for v in vectors])
    yield h, list(ids), matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    h.close()


def search_from_threads(h, pool_size: int, queries: np.ndarray) -> tuple[int, list]:
    """Run the searches from THREADS threads; return the most reader queries seen executing at once, and the hits."""
    results: list = [None] * len(queries)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(h.database_url, autocommit=True) as conn:
            while not stop.is_set():
                (active,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'segue-reader'"
                    " AND backend_type = 'client backend' AND state = 'active'").fetchone()
                peak = max(peak, active)

    with SegueReader(h.settings, database_url=h.database_url, read_miss_rate=0, pool_size=pool_size) as reader:
        def run(worker: int) -> None:
            for n in range(worker, len(queries), THREADS):
                results[n] = reader.search_vector(queries[n], "synthetic", fingerprint=FINGERPRINT, k=5).hits

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        sampler.join()
    return peak, results


def test_eight_threads_search_in_parallel_and_get_exact_results(corpus):
    h, ids, matrix = corpus
    queries = np.random.default_rng(8).standard_normal((THREADS * SEARCHES, DIM)).astype(np.float32)
    peak, results = search_from_threads(h, THREADS, queries)
    assert peak >= 2, "the reader's queries never ran at the same time"
    for query, hits in zip(queries, results):
        expected = np.argsort(-(matrix @ (query / np.linalg.norm(query))))[:5]
        assert [hit.doc_id for hit in hits] == [ids[i] for i in expected]
    serial_peak, _ = search_from_threads(h, 1, queries[:THREADS])
    assert serial_peak == 1  # one connection: one query at a time, which is what the pool removes
