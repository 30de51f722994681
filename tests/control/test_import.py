"""``segue import``: a corpus that already lives in a pgvector table, adopted without embedding it again.

The source is a table in another database: 20,000 short texts with 384-d vectors (the bundled
all-MiniLM-L6-v2's for the documents ``models bind`` samples, seeded random ones for the rest), an
``updated_at`` version and a ``lang`` column, plus three bad rows — one without text, one with an all-zero vector, one with a 383-d vector (the column is an untyped
``vector``). The tests import it, resume a killed import, migrate from the adopted model, bind it
to the model that made its vectors, and follow the table's changes.
"""

from __future__ import annotations

import re
import signal
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from segue.client.reader import SegueReader
from segue.client.search import QueryVector
from segue.control import registry
from segue.devtools.modelkit import build_tiny_transformer, minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.embedding.providers import inspect
from segue.spec import ModelSpec
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import ROOT, SEGUE, Harness, wait_for

ROWS = 20_000
ADOPTED = "legacy-minilm"
COLOURS = ["red", "blue", "green", "amber", "violet", "white", "black"]
THINGS = ["cell", "protein", "enzyme", "gene", "virus", "membrane", "receptor", "antibody"]


def text(n: int) -> str:
    return (f"item {n}: a {COLOURS[n % 7]} {THINGS[n % 8]} study, batch {n // 100}, "
            f"with {THINGS[(n // 8) % 8]} assays at {n % 97} degrees")


BOUND_SAMPLE = 500  # rows with real MiniLM vectors: the first ids in doc_id (text) order, which models bind samples


@pytest.fixture(scope="module")
def source_vectors(model_cache) -> np.ndarray:
    """20,000 384-d unit vectors: MiniLM's for the first ``BOUND_SAMPLE`` ids in doc_id order (what ``models bind``
    checks a provider against), seeded random ones for the rest (adopted bit for bit all the same, and cheap)."""
    cached = model_cache / "import-source-vectors.npy"
    if not cached.exists():
        vectors = np.random.default_rng(0).standard_normal((ROWS, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        sampled = [int(doc_id) for doc_id in sorted(map(str, range(ROWS)))[:BOUND_SAMPLE]]
        spec = ModelSpec.from_profile(1, "minilm", str(minilm_path()), inspect(str(minilm_path())))
        engine = EmbeddingEngine(device="cpu", batch_size=64)
        vectors[sampled] = engine.embed_sync(spec, [text(n) for n in sampled])
        engine.close()
        np.save(cached, vectors)
    return np.load(cached)


@pytest.fixture(scope="module")
def ih(tmp_path_factory, source_vectors):
    h = Harness(tmp_path_factory.mktemp("import"))
    h.conn.execute("CREATE DATABASE legacy")
    url = h.database_url.replace("/postgres?", "/legacy?")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        register_vector(conn)
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, content text, lang text,"
                     " updated_at timestamptz NOT NULL, embedding vector)")
        with conn.cursor().copy("COPY items (id, content, lang, updated_at, embedding) FROM STDIN"
                                " (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "text", "timestamptz", "vector"])
            base = datetime(2026, 1, 1, tzinfo=timezone.utc)
            for n in range(ROWS):
                copy.write_row([n, text(n), "en" if n % 3 else "fr", base + timedelta(seconds=n), source_vectors[n]])
        conn.execute("INSERT INTO items VALUES (20001, NULL, 'en', now(), %s), (20002, 'all zero', 'en', now(), %s),"
                     " (20003, 'too narrow', 'en', now(), %s)",
                     (source_vectors[0], np.zeros(384, dtype=np.float32), np.ones(383, dtype=np.float32)))
    h.legacy_url = url
    yield h
    h.close()


def import_args(h, *extra: str) -> list[str]:
    return ["import", "--source-url", h.legacy_url, "--table", "items", "--id-column", "id", "--text-column",
            "content", "--version-column", "updated_at", "--metadata-column", "lang", "--vector-column",
            "embedding", "--model", ADOPTED, *extra]


def vector_digests(url: str, table: str, id_column: str, vector_column: str) -> dict[str, str]:
    """md5 of each vector's exact text form, by id (pgvector prints floats so that they read back bit for bit)."""
    with psycopg.connect(url) as conn:
        return dict(conn.execute(sql.SQL("SELECT {id}::text, md5({v}::text) FROM {t} WHERE {v} IS NOT NULL").format(
            id=sql.Identifier(id_column), v=sql.Identifier(vector_column), t=sql.Identifier(table))).fetchall())


def adopted_column(h) -> str:
    return f"embedding_v{h.scalar('SELECT version FROM embedding_models WHERE name = %s', (ADOPTED,))}"


def test_an_import_adopts_every_good_vector_bit_for_bit_and_embeds_nothing(ih):
    worker = ih.start_worker()
    ih.wait_ready(worker)
    printed = " ".join(ih.segue(*import_args(ih)).stdout.split())
    assert "read 20003 rows" in printed and "wrote 20002 documents" in printed
    assert "skipped 1 row(s): no text" in printed
    assert "imported 1 document(s) without their vector: all-zero vector" in printed
    assert "imported 1 document(s) without their vector: dimension mismatch (not 384)" in printed
    with connections.connect(ih.settings, ih.database_url) as conn:
        adopted = registry.get_model(conn, ADOPTED).spec
    assert (adopted.provider, adopted.dim) == ("adopted", 384)
    stored = vector_digests(ih.database_url, "documents", "doc_id", adopted_column(ih))
    source = vector_digests(ih.legacy_url, "items", "id", "embedding")
    assert len(stored) == ROWS and all(stored[doc_id] == source[doc_id] for doc_id in stored)
    assert ih.scalar("SELECT version FROM documents WHERE doc_id = '5'") == 1767225605 * 1_000_000  # updated_at, µs
    assert ih.scalar("SELECT metadata FROM documents WHERE doc_id = '3'") == {"lang": "fr"}
    assert ih.scalar("SELECT count(*) FROM migration_changelog WHERE model_version = %s AND action = 'embedded'",
                     (adopted.version,)) == 0
    assert ih.sql("SELECT coverage_pct FROM migration_progress WHERE model = %s", (ADOPTED,))[0][0] < 100
    # A second run reads everything again and writes nothing: what is stored is as new.
    again = " ".join(ih.segue(*import_args(ih)).stdout.split())
    assert "wrote 0 documents, 20002 already stored at the same or a newer version" in again


def test_a_killed_import_resumes_to_the_same_result(ih):
    ih.conn.execute("CREATE DATABASE segue_resumed")
    target = ih.database_url.replace("/postgres?", "/segue_resumed?")
    env = {**ih.env, "SEGUE_DATABASE_URL": target}
    running = subprocess.Popen([SEGUE, *import_args(ih, "--page-size", "1000", "--rate", "4000")], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with psycopg.connect(target, autocommit=True) as conn:
        def read() -> int:
            if conn.execute("SELECT to_regclass('import_progress')").fetchone()[0] is None:
                return 0
            return conn.execute("SELECT coalesce(max(rows_read), 0) FROM import_progress").fetchone()[0]

        wait_for(lambda: read() >= 3000, timeout=60, what="three pages imported")
        running.send_signal(signal.SIGKILL)
        running.wait()
        at_kill = read()
        assert at_kill < ROWS, "the import finished before it could be killed"
        resumed = " ".join(ih.segue(*import_args(ih, "--page-size", "1000"), env=env).stdout.split())
        assert f"read {ROWS + 3 - at_kill} rows" in resumed  # from the watermark on, not from the start
    assert vector_digests(target, "documents", "doc_id", "embedding_v1") == vector_digests(
        ih.database_url, "documents", "doc_id", adopted_column(ih))
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == ROWS + 2


def test_a_migration_from_the_adopted_model_and_binding_it(ih, model_cache, tmp_path):
    ih.segue("migrate", "start", "--to", "new-tiny", "--source", str(modelfactory.tiny_transformer_a(model_cache)))
    with connections.connect(ih.settings, ih.database_url) as conn:
        adopted = registry.get_model(conn, ADOPTED).spec
    minilm = ModelSpec.from_profile(0, "minilm", str(minilm_path()), inspect(str(minilm_path())))
    engine = EmbeddingEngine(device="cpu")
    query = engine.embed_sync(minilm, ["a green protein study"])[0]
    engine.close()
    given = {ADOPTED: QueryVector(query, adopted.fingerprint)}
    # While the adopted model is read-only, a change re-embeds only the new model.
    ih.publish_changes([("11", b'{"doc_id": "11", "version": 99999999999999999, "text": "rewritten item eleven"}')])
    wait_for(lambda: ih.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = '11'"), what="the change")
    assert ih.sql("SELECT m.name, c.action FROM migration_changelog c JOIN embedding_models m"
                  " ON m.version = c.model_version WHERE c.doc_id = '11'") == [("new-tiny", "embedded")]
    with SegueReader(ih.settings, database_url=ih.database_url, read_miss_rate=10) as reader:
        result = reader.search("a green protein study", k=20, vectors=given)
        assert result.models == (ADOPTED, "new-tiny")  # the adopted column serves; the new model fills in
        assert {h.model for h in result.hits} >= {ADOPTED} and result.read_misses == []
        with pytest.raises(Exception, match="holds adopted vectors and Segue cannot embed"):
            reader.search("a green protein study", k=5)
    refused = ih.segue("backfill", "--model", ADOPTED, check=False)
    assert refused.returncode == 1 and "bind it first" in refused.stderr
    # A provider that does not make these vectors is refused; the bundled MiniLM is bound.
    impostor = build_tiny_transformer(tmp_path / "impostor", hidden_size=384)
    refused = ih.segue("models", "bind", ADOPTED, "--source", str(impostor), check=False)
    assert refused.returncode == 1 and "does not reproduce" in refused.stderr
    bound = ih.segue("models", "bind", ADOPTED, "--source", str(minilm_path())).stdout
    assert "bound legacy-minilm to transformer" in bound
    assert float(re.search(r"lowest cosine ([0-9.]+)", bound)[1]) >= 0.999
    ih.publish_changes([("12", b'{"doc_id": "12", "version": 99999999999999999, "text": "rewritten item twelve"}')])
    wait_for(lambda: ih.scalar(sql.SQL("SELECT {} = content_sha256 FROM documents WHERE doc_id = '12'").format(
        model_columns.sha_column(adopted.version))), timeout=120, what="the bound model to embed a change")
    with SegueReader(ih.settings, database_url=ih.database_url, read_miss_rate=0) as reader:
        assert reader.search("a green protein study", k=5).models[0] == ADOPTED  # text alone works now
    ih.segue("migrate", "cutover", "--force", "--reason", "test: no labels")
    ih.segue("migrate", "rollback")
    with SegueReader(ih.settings, database_url=ih.database_url, read_miss_rate=0) as reader:
        assert reader.search("a green protein study", k=5).models[0] == ADOPTED  # back on the adopted column


def test_follow_publishes_the_tables_changes_and_deletes(ih, tmp_path):
    worker = ih.start_worker()
    ih.wait_ready(worker)
    output = tmp_path / "follow.log"
    with psycopg.connect(ih.legacy_url, autocommit=True) as source, output.open("w") as log:
        follower = subprocess.Popen([SEGUE, *import_args(ih, "--follow", "--poll-s", "0.5",
                                                         "--reconcile-every-s", "1")],
                                    env=ih.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "following items" in output.read_text() or follower.poll() is not None,
                     timeout=120, what="the follower to start")
            assert follower.poll() is None, output.read_text()
            edited = "item 5, edited at the source"
            source.execute("UPDATE items SET content = %s, updated_at = now() WHERE id = 5", (edited,))
            source.execute("INSERT INTO items VALUES (30000, 'a row added later', 'en', now(), NULL)")
            source.execute("DELETE FROM items WHERE id = 7")
            wait_for(lambda: ih.scalar("SELECT body FROM documents WHERE doc_id = '5'") == edited
                     and ih.scalar("SELECT count(*) FROM documents WHERE doc_id = '30000'") == 1
                     and ih.scalar("SELECT count(*) FROM documents WHERE doc_id = '7'") == 0,
                     timeout=120, what="the edit, the new row and the delete to reach the documents")
            # The worker's probe document has an id no row of an integer-keyed table can have: not the table's.
            assert ih.scalar("SELECT count(*) FROM documents WHERE doc_id = %s", (f"probe-{worker.pid}",)) == 1
        finally:
            follower.send_signal(signal.SIGINT)
            follower.wait(timeout=60)
            ih.stop_worker(worker)
    assert follower.returncode == 0, output.read_text()


def test_a_uuid_keyed_table_is_imported_page_by_page_without_vectors(ih):
    """Keyset pages work for any id type: 20 rows of a uuid-keyed table in pages of 7, documents only."""
    with psycopg.connect(ih.legacy_url, autocommit=True) as source:
        source.execute("CREATE TABLE notes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), title text, body text)")
        source.execute("INSERT INTO notes (title, body) SELECT 'note ' || g, 'body ' || g"
                       " FROM generate_series(1, 20) g")
        ids = {str(i) for (i,) in source.execute("SELECT id FROM notes").fetchall()}
    printed = " ".join(ih.segue("import", "--source-url", ih.legacy_url, "--table", "notes", "--id-column", "id",
                                "--text-column", "title", "--text-column", "body", "--page-size", "7").stdout.split())
    assert "read 20 rows" in printed and "wrote 20 documents" in printed
    stored = dict(ih.sql("SELECT doc_id, body FROM documents WHERE doc_id = ANY(%s)", (list(ids),)))
    assert set(stored) == ids and all(re.fullmatch(r"note (\d+)\n\nbody \1", body) for body in stored.values())
