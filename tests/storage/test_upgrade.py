"""A database made by the landed code (before versioned upgrades) is upgraded in place and keeps everything.

The database is built as Segue built it before this change: the schema of
``schemas/schema.sql`` at the last landed commit (kept byte for byte as upgrade step
0001), models registered with the old registry columns, documents with vectors on
two models, changelog rows, a migration in progress. Then ``segue db upgrade`` runs,
and every row, vector and counter must be as it was, and a worker must run on it.
"""

from __future__ import annotations

import subprocess
from importlib import resources

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

from segue.embedding import providers
from segue.embedding.engine import EmbeddingEngine
from segue.spec import ModelSpec
from segue.storage import model_columns
from tests import modelfactory
from tests.harness import ROOT, Harness, change, run_segue, wait_for

LANDED = "b053382e559f891d5f96545b6cb4cd2624c758ca"  # the last commit before versioned upgrades
DOCS = 120


def initial_schema() -> str:
    return resources.files("segue.schemas").joinpath("upgrades/0001_initial.sql").read_text()


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, model_cache):
    """The embedded services, with a database named ``legacy`` as the landed code left it."""
    h = Harness(tmp_path_factory.mktemp("upgrade"))
    h.conn.execute("CREATE DATABASE legacy")
    url = h.database_url.replace("/postgres?", "/legacy?")
    sources = {"old-static": modelfactory.tiny_static(model_cache), "new-tiny": modelfactory.tiny_transformer_a(model_cache)}
    engine = EmbeddingEngine(device="cpu")
    texts = [f"legacy abstract {n}: proteins fold and cells divide" for n in range(DOCS)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        register_vector(conn)
        conn.execute(initial_schema())
        specs = []
        for version, (name, source) in enumerate(sources.items(), start=1):
            profile = providers.inspect(str(source))
            specs.append(ModelSpec.from_profile(version, name, str(source), profile))
            with conn.transaction():  # what the landed registry did
                conn.execute("INSERT INTO embedding_models (version, name, source, kind, dim, pooling, normalize,"
                             " max_tokens, fingerprint) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                             (version, name, str(source), profile.provider, profile.dim,
                              profile.config.get("pooling", "none"), profile.config["normalize"], profile.max_tokens,
                              profile.fingerprint))
                conn.execute(sql.SQL("ALTER TABLE documents ADD COLUMN {} vector({}), ADD COLUMN {} bytea").format(
                    model_columns.vector_column(version), sql.Literal(profile.dim), model_columns.sha_column(version)))
                conn.execute("INSERT INTO vector_counters (model_version) VALUES (%s)", (version,))
                conn.execute("INSERT INTO serving (read_model_version) VALUES (%s) ON CONFLICT DO NOTHING", (version,))
                model_columns.install_vector_counters(conn)
        vectors = {spec.version: engine.embed_sync(spec, texts) for spec in specs}
        engine.close()
        with conn.transaction():
            for n, text in enumerate(texts):
                conn.execute(
                    "INSERT INTO documents (doc_id, body, version, content_sha256, metadata, embedding_v1,"
                    " embedding_v1_sha256, embedding_v2, embedding_v2_sha256)"
                    " VALUES (%s, %s, 1, sha256(%s::bytea), %s, %s, sha256(%s::bytea), %s, sha256(%s::bytea))",
                    (f"doc-{n:03d}", text, text.encode(), Jsonb({"n": n}), vectors[1][n], text.encode(),
                     vectors[2][n] if n % 3 else None, text.encode() if n % 3 else None))
            conn.execute("INSERT INTO migration_changelog (doc_id, model_version, action, origin, doc_version)"
                         " SELECT doc_id, v, 'embedded', 'change', 1 FROM documents, (VALUES (1), (2)) m(v)")
            conn.execute("INSERT INTO migrations (from_version, to_version, state, settings)"
                         " VALUES (1, 2, 'running', '{\"cutover_min_coverage_pct\": 100.0}')")
    yield h, url, specs
    h.close()


def snapshot(url: str) -> dict:
    with psycopg.connect(url) as conn:
        register_vector(conn)
        return {
            "documents": conn.execute("SELECT doc_id, body, version, content_sha256, metadata, embedding_v1,"
                                      " embedding_v1_sha256, embedding_v2, embedding_v2_sha256 FROM documents"
                                      " ORDER BY doc_id").fetchall(),
            "changelog": conn.execute("SELECT id, doc_id, model_version, action, origin, doc_version FROM"
                                      " migration_changelog ORDER BY id").fetchall(),
            "counters": conn.execute("SELECT c.documents, v.model_version, v.current, v.stale FROM vector_counters v"
                                     " CROSS JOIN corpus_counters c ORDER BY 2").fetchall(),
            "migrations": conn.execute("SELECT id, from_version, to_version, state FROM migrations").fetchall(),
            "models": conn.execute("SELECT version, name, source, dim, max_tokens, fingerprint FROM embedding_models"
                                   " ORDER BY version").fetchall(),
        }


def test_step_one_is_the_landed_schema_byte_for_byte():
    landed = subprocess.run(["git", "show", f"{LANDED}:schemas/schema.sql"], cwd=ROOT, capture_output=True, text=True)
    if landed.returncode != 0:
        pytest.skip(f"this checkout has no history to compare with ({landed.stderr.strip()})")
    assert landed.stdout == initial_schema()


def test_upgrading_keeps_every_row_vector_and_counter(legacy):
    h, url, specs = legacy
    before = snapshot(url)
    assert len(before["documents"]) == DOCS and len(before["changelog"]) == 2 * DOCS
    env = {**h.env, "SEGUE_DATABASE_URL": url}
    upgraded = run_segue("db", "upgrade", env=env).stdout
    assert "0001_initial, 0002_reliability, 0003_providers" in upgraded
    after = snapshot(url)
    assert after["documents"] == before["documents"]
    for old_row, new_row in zip(before["documents"], after["documents"]):
        assert np.array_equal(old_row[5].to_numpy(), new_row[5].to_numpy())  # vectors bit for bit
    assert after == before
    assert "applied" not in run_segue("db", "upgrade", env=env).stdout  # a second run has nothing to do
    with psycopg.connect(url) as conn:
        providers_ = conn.execute("SELECT provider, config FROM embedding_models ORDER BY version").fetchall()
        columns = {c for (c,) in conn.execute("SELECT column_name FROM information_schema.columns"
                                              " WHERE table_name = 'embedding_models'")}
        (documents_options,) = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'documents'::regclass").fetchone()
    assert [p for p, _ in providers_] == ["static", "transformer"]
    assert providers_[1][1] == {"pooling": "mean", "normalize": True, "dtype": "float32", "attention": "sdpa",
                                "prefix": ""}
    assert not {"kind", "pooling", "normalize"} & columns
    assert documents_options == ["fillfactor=70"]  # 0008: room on each page for HOT updates
    listed = run_segue("models", "list", env=env).stdout
    assert "old-static" in listed and "new-tiny" in listed


def test_a_worker_runs_on_the_upgraded_database(legacy):
    h, url, specs = legacy
    env = {**h.env, "SEGUE_DATABASE_URL": url, "SEGUE_GROUP_ID": "segue-upgraded"}
    worker = h.start_worker(env)
    h.publish_changes([("doc-new", change("doc-new", "written after the upgrade", 1))])
    h.publish_read_misses([("doc-003", b'{"doc_id": "doc-003", "model": "new-tiny"}')])  # lacks its v2 vector

    def done() -> bool:
        with psycopg.connect(url) as conn:
            (new,) = conn.execute("SELECT embedding_v1_sha256 = content_sha256 AND embedding_v2_sha256 = content_sha256"
                                  " FROM documents WHERE doc_id = 'doc-new'").fetchone() or (None,)
            (healed,) = conn.execute("SELECT embedding_v2_sha256 = content_sha256 FROM documents"
                                     " WHERE doc_id = 'doc-003'").fetchone()
        assert worker.poll() is None, h.worker_log(worker)[-3000:]
        return bool(new and healed)

    wait_for(done, timeout=120, what="a change and a read miss processed on the upgraded database")
    with psycopg.connect(url) as conn:
        total = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        progress = conn.execute("SELECT model_version, total_documents, current_vectors FROM migration_progress"
                                " ORDER BY 1").fetchall()
        direct = [conn.execute(sql.SQL("SELECT count(*) FROM documents WHERE {} = content_sha256").format(
            model_columns.sha_column(v))).fetchone()[0] for v in (1, 2)]
    assert progress == [(1, total, direct[0]), (2, total, direct[1])]
