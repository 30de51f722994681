"""A database made by the landed code (before versioned upgrades) is upgraded in place and keeps everything.

The database is built as Segue built it before this change: the schema of
``schemas/schema.sql`` at the last landed commit (kept byte for byte as upgrade step
0001), models registered with the old registry columns, documents with vectors on
two models, changelog rows, a migration in progress. Then ``segue db upgrade`` runs,
and every row, vector and counter must be as it was, its schema must be a new database's
(tables, constraints, indexes, views, functions, triggers), a changed view is applied again
alone, and a worker must run on it.
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
from segue.storage import model_columns, upgrades
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


def catalog(url: str) -> dict:
    """What the schema declares, the registered models' columns and generated counter functions aside."""
    with psycopg.connect(url) as conn:
        return {
            "columns": conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
                " WHERE table_schema = 'public' AND column_name NOT LIKE 'embedding\\_v%' ORDER BY 1, 2").fetchall(),
            "constraints": conn.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
                " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall(),
            "indexes": conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                                    " AND indexname NOT LIKE 'documents\\_embedding\\_v%' ORDER BY 1").fetchall(),
            "views": conn.execute("SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'"
                                  " ORDER BY 1").fetchall(),
            "functions": conn.execute("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'segue\\_%'"
                                      " AND proname NOT LIKE 'segue\\_count\\_documents\\_%' ORDER BY 1").fetchall(),
            "triggers": conn.execute("SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text FROM pg_trigger"
                                     " WHERE NOT tgisinternal ORDER BY 1, 2").fetchall(),
            "steps": conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY 1").fetchall(),
            "idempotent": conn.execute("SELECT name, checksum FROM schema_idempotent ORDER BY 1").fetchall(),
        }


def test_an_upgraded_database_ends_as_a_new_one(legacy):
    h, url, _ = legacy
    h.conn.execute("CREATE DATABASE fresh")
    fresh = url.replace("/legacy?", "/fresh?")
    applied = run_segue("db", "upgrade", env={**h.env, "SEGUE_DATABASE_URL": fresh}).stdout
    assert "0010_abort" in applied and "idempotent/02_migration_progress.sql" in applied
    new, upgraded = catalog(fresh), catalog(url)
    assert {"migration_progress", "migration_progress_by_origin", "model_spend", "query_drift"} <= {
        name for name, _ in new["views"]}
    assert len(new["idempotent"]) == len(upgrades.definitions()) and new["steps"][-1][0] == upgrades.latest_schema_version()
    for part in new:
        assert upgraded[part] == new[part], part


def test_a_changed_view_is_applied_again_and_only_it(legacy):
    h, url, _ = legacy
    env = {**h.env, "SEGUE_DATABASE_URL": url}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP VIEW model_spend")  # what a newer definition would replace
        conn.execute("UPDATE schema_idempotent SET checksum = 'older' WHERE name = '04_model_spend.sql'")
        (before,) = conn.execute("SELECT max(applied_at) FROM schema_idempotent"
                                 " WHERE name <> '04_model_spend.sql'").fetchone()
    refused = run_segue("models", "list", env=env, check=False)  # a read-only command runs no DDL: it says so
    assert refused.returncode == 1 and "04_model_spend.sql" in refused.stderr and "segue db upgrade" in refused.stderr
    upgraded = run_segue("db", "upgrade", env=env).stdout
    assert "applied 1 schema upgrade(s): idempotent/04_model_spend.sql" in upgraded
    assert "applied" not in run_segue("db", "upgrade", env=env).stdout
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM model_spend").fetchone()[0] == 2
        (after,) = conn.execute("SELECT max(applied_at) FROM schema_idempotent"
                                " WHERE name <> '04_model_spend.sql'").fetchone()
    assert after == before  # the others were left alone


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
