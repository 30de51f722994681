"""The migration lifecycle on its own embedded services and worker.

The tests in this module run in order on one database: a migration from a static
"alpha" model to a tiny transformer "beta" is started, backfilled (killed and
resumed), gated, cut over, rolled back, cut over again and finished.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from datetime import timedelta

import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from segue.client.reader import SegueReader
from segue.control import indexes, migration, registry
from segue.control.backfill import BackfillLimits, run_backfill
from segue.control.plan import (
    fill_bloat_bytes,
    fill_wal_bytes,
    not_hot_share,
    out_of_line,
    page_images_per_row,
    plan,
    table_shape,
    vector_storage_bytes,
)
from segue.devtools.modelkit import minilm_path
from segue.embedding.engine import EmbeddingEngine
from segue.schemas.events import encode_read_miss
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import ROOT, SEGUE, Harness, change, wait_for

ALPHA, BETA = "alpha", "beta"
CORPUS = 240


@pytest.fixture(scope="module")
def mh(tmp_path_factory, model_cache):
    """A harness of this module's own, with only the old model registered and a corpus written."""
    h = Harness(tmp_path_factory.mktemp("migration"))
    h.env.update(SEGUE_SWEEPER_INTERVAL_S="1", SEGUE_SWEEPER_MAX_AGE_S="2")
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, ALPHA, str(modelfactory.tiny_static(model_cache)))
    worker = h.start_worker()
    h.wait_ready(worker)
    ids = [f"doc-{n:04d}" for n in range(CORPUS)]
    h.publish_changes([(i, change(i, f"abstract {n}: proteins fold and cells divide", 1)) for n, i in enumerate(ids)])
    wait_for(lambda: h.scalar("SELECT count(*) FROM documents WHERE doc_id LIKE 'doc-%%'") == CORPUS,
             what="the corpus")
    yield h
    h.close()


def conn_of(h):
    return connections.connect(h.settings, h.database_url)


def beta(h):
    with conn_of(h) as conn:
        return registry.get_model(conn, BETA).spec


def coverage(h, version: int) -> float:
    with conn_of(h) as conn:
        return migration.coverage_pct(conn, version)


def registry_and_columns(h) -> tuple[list[str], set[str]]:
    models = [name for (name,) in h.sql("SELECT name FROM embedding_models ORDER BY version")]
    columns = {c for (c,) in h.sql("SELECT column_name FROM information_schema.columns WHERE table_name = 'documents'")}
    return models, columns


def test_a_failed_migrate_start_leaves_no_model_registered(mh, model_cache):
    before = registry_and_columns(mh)
    failed = mh.segue("migrate", "start", "--to", "gamma-b", "--from", "no-such-model",
                      "--source", str(modelfactory.tiny_transformer_b(model_cache)), check=False)
    assert failed.returncode == 1 and "no model named 'no-such-model'" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert registry_and_columns(mh) == before  # the registration was undone with the failed start
    assert mh.scalar("SELECT count(*) FROM migrations") == 0


def test_start_records_a_migration_and_allows_only_one(mh, model_cache):
    with conn_of(mh) as conn:
        registry.register_model(conn, BETA, str(modelfactory.tiny_transformer_a(model_cache)))
        started = migration.start(conn, BETA, cutover_min_coverage_pct=100.0)
        assert (started.from_name, started.to_name, started.state) == (ALPHA, BETA, "running")
        with pytest.raises(migration.MigrationError, match="one migration at a time"):
            migration.start(conn, BETA, cutover_min_coverage_pct=100.0)
        assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == 1
        logged = conn.execute("SELECT action, origin FROM migration_changelog WHERE origin = 'control'").fetchall()
        assert logged == [("migration_started", "control")]
    # From now on a change is dual-written, while the old corpus still lacks beta vectors.
    mh.publish_changes([("fresh", change("fresh", "written during the migration", 1))])
    wait_for(lambda: mh.scalar(sql.SQL("SELECT {} FROM documents WHERE doc_id = 'fresh'").format(
        model_columns.sha_column(beta(mh).version))), what="fresh to be dual-written")
    assert coverage(mh, beta(mh).version) < 5


def test_a_second_migrate_start_is_refused_before_registering(mh, model_cache):
    before = registry_and_columns(mh)
    refused = mh.segue("migrate", "start", "--to", "gamma-b", "--source",
                       str(modelfactory.tiny_transformer_b(model_cache)), check=False)
    assert refused.returncode == 1 and "one migration at a time" in refused.stderr
    assert registry_and_columns(mh) == before


def test_a_second_migrate_start_is_refused_before_the_model_is_read(mh, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    refused = mh.segue("migrate", "start", "--to", "gamma-c", "--source", str(not_a_model), check=False)
    # Refused for the migration in progress, not for the folder: the rule is checked before the model is loaded.
    assert refused.returncode == 1 and "one migration at a time: finish or abort it first" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_plan_measures_throughput_and_estimates_cost(mh):
    spec = beta(mh)
    engine = EmbeddingEngine(device="cpu")
    try:
        with conn_of(mh) as conn:
            (docs,) = conn.execute("SELECT documents FROM corpus_counters").fetchone()
            estimate = plan(conn, engine, spec, sample=16, gpu_hour_usd=3.0, documents_to_embed=200,
                            index_policy=indexes.IndexPolicy(min_coverage_pct=95.0, m=16, ef_construction=64,
                                                             max_memory_mb=0, max_failures=3))
    finally:
        engine.close()
    assert estimate.truncated_in_sample == 0  # short abstracts, 128-token limit
    assert any("will not fit the 0 MiB cap" in line for line in estimate.lines())
    assert estimate.throughput_docs_per_s > 0 and estimate.sample_docs == 16
    assert estimate.seconds == pytest.approx(200 / estimate.throughput_docs_per_s)
    assert estimate.cost_usd == pytest.approx(estimate.seconds / 3600 * 3.0)
    assert estimate.hnsw_memory_bytes == int(docs * (4 * spec.dim + 8) * 1.3)
    with conn_of(mh) as conn:
        shape = table_shape(conn)
    assert shape.rows == docs and 0 < shape.tuple_bytes < 8192 and 0 <= shape.room < 1
    assert estimate.storage_bytes == pytest.approx(docs * vector_storage_bytes(spec.dim, shape.tuple_bytes), rel=0.05)
    assert estimate.checkpoint_intervals >= 1 and 0 <= estimate.not_hot_share <= 0.32
    tuple_bytes = estimate.dead_bytes / 200  # each of the 200 updates leaves its old row version dead
    assert 0 < tuple_bytes < 8192
    assert estimate.bloat_bytes == pytest.approx(200 * estimate.not_hot_share * tuple_bytes, abs=1)
    assert estimate.wal_max_bytes >= estimate.wal_bytes > 200 * (4 * spec.dim + 8 + tuple_bytes)  # vector, page image
    printed = mh.segue("migrate", "plan", "--to", BETA, "--sample", "8")
    missing = round(docs * (1 - coverage(mh, spec.version) / 100))
    assert f"documents to embed: {missing}" in printed.stdout
    for fragment in ("docs/s on cpu", "estimated time", "estimated cost", "extra storage", "HNSW build memory",
                     "WAL to fill the column: ≈", "bloat: ≈"):
        assert fragment in printed.stdout


def test_fill_wal_and_bloat_grow_with_rows_dimension_and_text():
    """The plan's WAL and bloat formulas: linear in rows, growing with the vector and the row, shrunk by room."""
    base = fill_wal_bytes(100_000, 768, 1250.0, not_hot=0.40)
    # bench_storage measured 5,913 and 5,458 bytes a row (tuples of 1,243 bytes, fillfactor 100 and 70)
    assert fill_wal_bytes(100_000, 768, 1243.0, not_hot=0.32) / 100_000 == pytest.approx(5_913, rel=0.02)
    assert fill_wal_bytes(100_000, 768, 1243.0, not_hot=0.005) / 100_000 == pytest.approx(5_458, rel=0.02)
    assert fill_wal_bytes(200_000, 768, 1250.0, not_hot=0.40) == pytest.approx(2 * base, abs=1)
    assert fill_wal_bytes(100_000, 1536, 1250.0, not_hot=0.40) - base >= 100_000 * 4 * 768  # the wider vectors
    assert fill_wal_bytes(100_000, 768, 2000.0, not_hot=0.40) > base  # longer texts: bigger rows to rewrite
    assert fill_wal_bytes(100_000, 768, 1250.0, not_hot=0.40, images=3.0) > base  # checkpoints during the fill
    assert page_images_per_row(1, 6) == 1 < page_images_per_row(10, 6) < page_images_per_row(1000, 6) <= 6
    assert not_hot_share(0.0) == 0.32 and not_hot_share(0.34) == pytest.approx(0.005) and not_hot_share(0.9) == 0
    assert not_hot_share(0.1) > not_hot_share(0.2) > not_hot_share(0.3)
    assert fill_bloat_bytes(200_000, 1250.0, 0.40) == 2 * fill_bloat_bytes(100_000, 1250.0, 0.40) > 0
    assert fill_bloat_bytes(100_000, 2000.0, 0.40) > fill_bloat_bytes(100_000, 1250.0, 0.40)
    assert fill_bloat_bytes(100_000, 1250.0, 0.0) == 0


@pytest.mark.parametrize("dim", [768, 1536])
def test_the_plans_storage_per_vector_is_what_postgresql_stores(mh, dim):
    """Rows of 1,200 characters: 768-d and 1,536-d vectors go to TOAST chunks (a 64-d one stays in the row, where
    what it costs depends on how many rows still fit a page)."""
    rows = 2_000
    with conn_of(mh) as conn, conn.transaction():
        conn.execute(sql.SQL("CREATE TEMP TABLE sized (id int, body text, v vector({}), h bytea)"
                             " ON COMMIT DROP").format(sql.Literal(dim)))
        conn.execute("INSERT INTO sized SELECT g, md5(g::text) || repeat(md5((g + 1)::text), 36), NULL, NULL"
                     " FROM generate_series(1, %s) g", (rows,))
        (before,) = conn.execute("SELECT pg_total_relation_size('sized')").fetchone()
        (width,) = conn.execute("SELECT avg(pg_column_size(s.*)) FROM sized s").fetchone()
        conn.execute(sql.SQL("CREATE TEMP TABLE filled ON COMMIT DROP AS SELECT id, body,"
                             " (SELECT array_agg(random())::vector({dim}) FROM generate_series(1, {dim}) WHERE s.id > 0) v,"
                             " sha256(id::text::bytea) h FROM sized s").format(dim=sql.Literal(dim)))
        (after,) = conn.execute("SELECT pg_total_relation_size('filled')").fetchone()
    measured = (after - before) / rows
    tuple_bytes = float(width) + 40
    assert out_of_line(dim, tuple_bytes) and not out_of_line(64, tuple_bytes)
    assert vector_storage_bytes(dim, tuple_bytes) == pytest.approx(measured, rel=0.06)


def test_cutover_and_index_wait_for_coverage(mh):
    with conn_of(mh) as conn:
        with pytest.raises(migration.MigrationError, match="coverage .* is below 100.00%.*no quality verdict"):
            migration.cutover(conn)
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == 1
        policy = indexes.IndexPolicy(min_coverage_pct=95.0, m=8, ef_construction=32, max_memory_mb=1024,
                                       max_failures=3)
        with pytest.raises(indexes.IndexWaits, match="the HNSW index waits, not built"):
            indexes.build(conn, beta(mh).version, policy)
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%%hnsw'").fetchone()[0] == 0


def test_backfill_budget_and_rate_are_respected(mh):
    spec = beta(mh)
    with conn_of(mh) as conn:
        by_docs = asyncio.run(run_backfill(mh.settings, conn, mh.bootstrap, spec, BackfillLimits(max_docs=30),
                                           page_size=20))
        assert (by_docs.published, by_docs.stopped) == (30, "budget")
        gpu = BackfillLimits(max_gpu_seconds=1.0, throughput=12.0, rate=20.0)
        started = time.perf_counter()
        by_gpu = asyncio.run(run_backfill(mh.settings, conn, mh.bootstrap, spec, gpu, page_size=20))
        elapsed = time.perf_counter() - started
        assert (by_gpu.published, by_gpu.stopped) == (12, "budget")
        assert elapsed >= 11 / 20.0  # 12 documents at 20 docs/s: the 12th no earlier than 0.55 s in
        assert "stopped at the budget" in by_gpu.describe(gpu)
        watermark, published = conn.execute(
            "SELECT watermark, published FROM backfill_progress WHERE model_version = %s", (spec.version,)).fetchone()
        assert published == 42 and watermark == by_gpu.watermark


def test_backfill_resumes_after_being_killed(mh):
    spec = beta(mh)
    # With no worker embedding meanwhile, what the resumed run publishes is exactly what it skipped.
    mh.stop_worker(mh.workers[-1])
    command = [SEGUE, "backfill", "--page-size", "20"]
    watermark = "SELECT watermark FROM backfill_progress WHERE model_version = %s"
    before = mh.scalar(watermark, (spec.version,))
    first = subprocess.Popen(command + ["--rate", "40"], env=mh.env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: mh.scalar(watermark, (spec.version,)) > before, timeout=60, what="the backfill to commit a page")
    first.send_signal(signal.SIGKILL)
    first.wait()
    at_kill = mh.scalar(watermark, (spec.version,))
    assert at_kill < "doc-0200", "the backfill finished before it could be killed"
    lacking = sql.SQL("SELECT count(*) FROM documents WHERE doc_id > %s AND {} IS DISTINCT FROM content_sha256").format(
        model_columns.sha_column(spec.version))
    after_watermark, in_total = mh.scalar(lacking, (at_kill,)), mh.scalar(lacking, ("",))
    second = subprocess.run(command, env=mh.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "backfill complete" in second.stdout
    resumed = int(second.stdout.split("published ")[-1].split(" ")[0])
    assert resumed == after_watermark < in_total, "the second run did not continue from the watermark"
    mh.wait_ready(mh.start_worker())


def test_workers_build_the_index_once_coverage_allows(mh):
    spec = beta(mh)
    wait_for(lambda: coverage(mh, spec.version) == 100.0, timeout=120, what="full beta coverage")
    index = f"documents_embedding_v{spec.version}_hnsw"
    (detail,) = wait_for(lambda: mh.sql("SELECT detail FROM migration_changelog WHERE action = 'index_built'"),
                         timeout=60, what="the worker to build the HNSW index")[0]
    assert detail["coverage_pct"] >= 95.0 and detail["maintenance_work_mem_mb"] >= 64
    definition, valid = mh.sql("SELECT indexdef, indisvalid FROM pg_indexes JOIN pg_index"
                               " ON indexrelid = to_regclass(indexname) WHERE indexname = %s", (index,))[0]
    assert valid and "USING hnsw" in definition and "vector_cosine_ops" in definition


def test_sweeper_heals_a_lost_reembed(mh):
    spec = beta(mh)
    # As if a backfill record had been lost: the document is behind the finished backfill, without a vector.
    mh.sql(sql.SQL("UPDATE documents SET {} = NULL, {} = NULL WHERE doc_id = 'doc-0007' RETURNING 1").format(
        model_columns.vector_column(spec.version), model_columns.sha_column(spec.version)))
    assert coverage(mh, spec.version) < 100.0
    wait_for(lambda: coverage(mh, spec.version) == 100.0, timeout=60, what="the sweeper to re-enqueue doc-0007")
    assert mh.sql("SELECT origin, event_id, action FROM migration_changelog WHERE doc_id = 'doc-0007'"
                  " AND model_version = %s ORDER BY id DESC LIMIT 1", (spec.version,)) == [
        ("backfill", "sweeper", "embedded")]


def test_read_miss_is_embedded_before_a_queued_backfill(mh, model_cache):
    with conn_of(mh) as conn:
        # MiniLM is slow enough on a CPU for the backfill to queue up behind the engine.
        gamma = registry.register_model(conn, "gamma", str(minilm_path()))
    ids = [f"doc-{n:04d}" for n in range(CORPUS)]
    mh.publish(mh.settings.topic_backfill, [(i, encode_read_miss(i, "gamma")) for i in ids[1:]])
    mh.publish_read_misses([(ids[0], encode_read_miss(ids[0], "gamma", "urgent"))])
    wait_for(lambda: mh.scalar("SELECT count(*) FROM migration_changelog WHERE event_id = 'urgent'"),
             timeout=120, what="the read miss")
    miss_id = mh.scalar("SELECT id FROM migration_changelog WHERE event_id = 'urgent'")
    current = sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {} = content_sha256").format(
        model_columns.sha_column(gamma.version))
    wait_for(lambda: mh.scalar(current, (ids,)) == CORPUS, timeout=180, what="the backfill of gamma")
    before = mh.scalar("SELECT count(*) FROM migration_changelog WHERE origin = 'backfill' AND model_version = %s"
                       " AND action = 'embedded' AND id < %s", (gamma.version, miss_id))
    assert before < (CORPUS - 1) / 2, f"{before} backfill documents were embedded before the read miss"
    with conn_of(mh) as conn:  # gamma was only here to measure priority
        with conn.transaction():
            conn.execute("UPDATE embedding_models SET state = 'retired' WHERE version = %s", (gamma.version,))
            model_columns.install_vector_counters(conn)


def record_verdict(conn, current: migration.Migration, verdict: str) -> None:
    """A verdict row as ``segue eval`` records it, the gate's input (tests/quality/test_eval.py runs the real thing;
    the tiny random models here have no quality to measure)."""
    conn.execute(
        "INSERT INTO model_evaluations (migration_id, kind, old_version, new_version, metric, old_value, new_value,"
        " verdict, detail) VALUES (%s, 'labelled', %s, %s, 'ndcg@10', 0.41, %s, %s, %s)",
        (current.id, current.from_version, current.to_version, 0.52 if verdict == "pass" else 0.38, verdict,
         Jsonb({"coverage": {"old": 100.0, "new": 100.0}})))


def test_cutover_rollback_cutover_finish(mh):
    spec = beta(mh)
    with conn_of(mh) as conn:
        current = migration.active_migration(conn)
        with pytest.raises(migration.MigrationError, match="no quality verdict"):
            migration.cutover(conn)
        record_verdict(conn, current, "fail")
        with pytest.raises(migration.MigrationError, match="verdict .* is fail"):
            migration.cutover(conn)
        record_verdict(conn, current, "pass")
        assert migration.refresh(conn).state == "ready"

        assert migration.cutover(conn).state == "cut_over"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == spec.version
        assert migration.rollback(conn).state == "rolled_back"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == current.from_version
    # Still dual-written after the rollback.
    mh.publish_changes([("after-rollback", change("after-rollback", "both models still", 1))])
    wait_for(lambda: mh.scalar(sql.SQL("SELECT {} IS NOT NULL AND {} IS NOT NULL FROM documents"
                                       " WHERE doc_id = 'after-rollback'").format(
        model_columns.sha_column(current.from_version), model_columns.sha_column(spec.version))), what="dual-write after rollback")

    with conn_of(mh) as conn:
        assert migration.cutover(conn).state == "cut_over"
        with pytest.raises(migration.MigrationError, match="grace period"):
            migration.finish(conn, grace=timedelta(hours=1))
        done = migration.finish(conn, grace=timedelta(0))
        assert done.state == "finished"
        columns = {c for (c,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'documents'").fetchall()}
        assert f"embedding_v{current.from_version}" not in columns
        assert f"embedding_v{spec.version}" in columns
        assert registry.get_model(conn, ALPHA).state == "retired"
        actions = [a for (a,) in conn.execute(
            "SELECT action FROM migration_changelog WHERE origin = 'control' ORDER BY id").fetchall()]
        assert actions == ["migration_started", "index_built", "migration_ready", "migration_cut_over",
                           "migration_rolled_back", "migration_cut_over", "migration_finished"]
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%%hnsw'").fetchone()[0] == 1
    # The worker stops writing the retired model and counters stay exact.
    mh.publish_changes([("after-finish", change("after-finish", "only beta now", 1))])
    wait_for(lambda: mh.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = 'after-finish'"),
             what="a change after finish")
    assert mh.scalar("SELECT array_agg(model_version) FROM migration_changelog WHERE doc_id = 'after-finish'") == [
        spec.version]
    # And frees it: the running worker unloads the retired model.
    assert f"unloaded retired model version(s) {current.from_version}" in mh.worker_log(mh.workers[-1])
    total = mh.scalar("SELECT count(*) FROM documents")
    assert mh.sql("SELECT model, total_documents, current_vectors FROM migration_progress") == [
        (BETA, total, total)]


def test_pause_stops_the_backfill_and_a_forced_cutover_logs_its_reason(mh, model_cache):
    with conn_of(mh) as conn:
        registry.register_model(conn, "delta", str(modelfactory.tiny_static(model_cache)))
        started = migration.start(conn, "delta", cutover_min_coverage_pct=100.0)
        assert (started.from_name, started.to_name) == (BETA, "delta")
        assert migration.pause(conn).state == "paused"
        delta = registry.get_model(conn, "delta").spec
        outcome = asyncio.run(run_backfill(mh.settings, conn, mh.bootstrap, delta, BackfillLimits()))
        assert (outcome.published, outcome.stopped) == (0, "paused")
        assert migration.resume(conn).state == "running"

        forced = migration.cutover(conn, force_reason="incident 42: old model endpoint down")
        assert forced.state == "cut_over"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == delta.version
        (detail,) = conn.execute("SELECT detail FROM migration_changelog WHERE action = 'migration_cut_over'"
                                 " ORDER BY id DESC LIMIT 1").fetchone()
        assert detail["forced"] is True and detail["reason"] == "incident 42: old model endpoint down"
        assert any("no quality verdict" in why for why in detail["gate_failures"])
        assert migration.rollback(conn).state == "rolled_back"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == beta(mh).version


def control_rows(h, migration_id: int) -> list[tuple]:
    return h.sql("SELECT action, detail->>'previous_state', detail->>'retired' FROM migration_changelog"
                 " WHERE origin = 'control' AND event_id = %s ORDER BY id", (f"migration-{migration_id}",))


def assert_dropped(h, spec) -> None:
    """``spec`` is retired: its columns, index and counters are gone, and migration_progress leaves it out."""
    _, columns = registry_and_columns(h)
    assert {f"embedding_v{spec.version}", f"embedding_v{spec.version}_sha256"}.isdisjoint(columns)
    assert h.scalar("SELECT state FROM embedding_models WHERE version = %s", (spec.version,)) == "retired"
    assert h.scalar("SELECT count(*) FROM vector_counters WHERE model_version = %s", (spec.version,)) == 0
    assert h.scalar("SELECT count(*) FROM pg_indexes WHERE indexname = %s",
                    (f"documents_embedding_v{spec.version}_hnsw",)) == 0
    assert spec.name not in {model for (model,) in h.sql("SELECT model FROM migration_progress")}


def assert_written_by_beta_alone(h, doc_id: str) -> None:
    """A change published now is written with beta's vector alone."""
    h.publish_changes([(doc_id, change(doc_id, "only beta again", 1))])
    wait_for(lambda: h.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = %s", (doc_id,)),
             what=f"{doc_id}, a change after the abort")
    assert h.scalar("SELECT array_agg(model_version) FROM migration_changelog WHERE doc_id = %s",
                    (doc_id,)) == [beta(h).version]


def test_abort_from_rolled_back_retires_the_new_model(mh):
    with conn_of(mh) as conn:
        current = migration.active_migration(conn)
        delta = registry.get_model(conn, "delta").spec
    assert (current.state, current.to_name) == ("rolled_back", "delta")
    aborted = mh.segue("migrate", "abort").stdout
    assert f"migration {current.id} aborted: delta retired" in aborted and f"reads stay on {BETA}" in aborted
    assert "no migration in progress" in mh.segue("migrate", "status").stdout
    with conn_of(mh) as conn:
        assert migration.get_migration(conn, current.id).state == "aborted"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == beta(mh).version
    assert_dropped(mh, delta)
    assert control_rows(mh, current.id)[-1] == ("migration_aborted", "rolled_back", "delta")
    assert_written_by_beta_alone(mh, "after-abort")
    total = mh.scalar("SELECT count(*) FROM documents")
    assert mh.sql("SELECT model, total_documents, current_vectors FROM migration_progress") == [(BETA, total, total)]


@pytest.mark.parametrize("state", ["running", "paused"])
def test_abort_from_running_or_paused(mh, model_cache, state):
    name = f"epsilon-{state}"
    with conn_of(mh) as conn:
        registry.register_model(conn, name, str(modelfactory.tiny_static(model_cache)))
        started = migration.start(conn, name, cutover_min_coverage_pct=100.0)
        if state == "paused":
            migration.pause(conn)
        spec = registry.get_model(conn, name).spec
    doc_id = f"during-{state}"
    mh.publish_changes([(doc_id, change(doc_id, "dual-written until the abort", 1))])
    wait_for(lambda: mh.scalar(sql.SQL("SELECT {} FROM documents WHERE doc_id = %s").format(
        model_columns.sha_column(spec.version)), (doc_id,)), what=f"{doc_id} to be dual-written")
    with conn_of(mh) as conn:
        aborted = migration.abort(conn)
        assert (aborted.id, aborted.state) == (started.id, "aborted")
        assert migration.active_migration(conn) is None
    assert_dropped(mh, spec)
    assert control_rows(mh, started.id)[-1] == ("migration_aborted", state, name)
    # The worker, which wrote the new model until then, writes the old one alone and frees the new one.
    assert_written_by_beta_alone(mh, f"after-abort-{state}")
    assert f"unloaded retired model version(s) {spec.version}" in mh.worker_log(mh.workers[-1])


def test_an_abort_stops_a_running_backfill_and_settles_its_records(mh, model_cache):
    with conn_of(mh) as conn:
        registry.register_model(conn, "theta", str(modelfactory.tiny_static(model_cache)))
        migration.start(conn, "theta", cutover_min_coverage_pct=100.0)
        theta = registry.get_model(conn, "theta").spec
    limits = BackfillLimits(rate=20.0)  # 5 documents a page: about 4 pages a second
    outcome = {}

    def backfill() -> None:
        with conn_of(mh) as conn:
            outcome["run"] = asyncio.run(run_backfill(mh.settings, conn, mh.bootstrap, theta, limits, page_size=5))

    running = threading.Thread(target=backfill)
    running.start()
    wait_for(lambda: mh.scalar("SELECT watermark FROM backfill_progress WHERE model_version = %s", (theta.version,)),
             what="the backfill to commit a page")
    with conn_of(mh) as conn:
        migration.abort(conn)
    running.join()
    assert outcome["run"].stopped == "retired" and 0 < outcome["run"].published < CORPUS
    assert "stopped: the model was retired" in outcome["run"].describe(limits)
    # Records for it still queued are settled as superseded, not dead-lettered.
    late = ["doc-0001", "doc-0002", "doc-0003"]
    mh.publish(mh.settings.topic_backfill, [(i, encode_read_miss(i, "theta", "late-theta")) for i in late])
    mh.publish_read_misses([(late[0], encode_read_miss(late[0], "theta", "late-theta"))])
    wait_for(lambda: mh.scalar("SELECT count(*) FROM migration_changelog WHERE event_id = 'late-theta'") == 4,
             what="the records for the retired model")
    assert mh.sql("SELECT DISTINCT action, model_version FROM migration_changelog WHERE event_id = 'late-theta'") == [
        ("superseded", theta.version)]
    assert_dropped(mh, theta)


def test_abort_is_refused_after_cutover_where_rollback_is_the_way(mh, model_cache):
    with conn_of(mh) as conn:
        registry.register_model(conn, "zeta", str(modelfactory.tiny_static(model_cache)))
        migration.start(conn, "zeta", cutover_min_coverage_pct=100.0)
        cut = migration.cutover(conn, force_reason="trying zeta out")
        zeta = registry.get_model(conn, "zeta").spec
    refused = mh.segue("migrate", "abort", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "reads use zeta" in refused.stderr and "segue migrate rollback" in refused.stderr
    with conn_of(mh) as conn:
        assert migration.active_migration(conn).state == "cut_over"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == zeta.version
    _, columns = registry_and_columns(mh)
    assert f"embedding_v{zeta.version}" in columns
    # The way out the refusal names: roll back, then abort.
    with conn_of(mh) as conn:
        migration.rollback(conn)
        assert migration.abort(conn).state == "aborted"
        assert conn.execute("SELECT read_model_version FROM serving").fetchone()[0] == beta(mh).version
    assert_dropped(mh, zeta)
    assert [action for action, _, _ in control_rows(mh, cut.id)] == [
        "migration_started", "migration_cut_over", "migration_rolled_back", "migration_aborted"]


def test_readers_never_fail_on_the_column_an_abort_drops(mh, model_cache):
    with conn_of(mh) as conn:
        registry.register_model(conn, "eta", str(modelfactory.tiny_static(model_cache)))
        migration.start(conn, "eta", cutover_min_coverage_pct=100.0)
        eta = registry.get_model(conn, "eta").spec
    ids = [f"reader-{n}" for n in range(5)]
    mh.publish_changes([(i, change(i, f"proteins fold and cells divide, reader {n}", 1)) for n, i in enumerate(ids)])
    current = sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {} = content_sha256").format(
        model_columns.sha_column(eta.version))
    wait_for(lambda: mh.scalar(current, (ids,)) == len(ids), what="the reader documents on eta")
    query = "proteins fold"
    engine = EmbeddingEngine(device="cpu")
    readers = {mode: SegueReader(mh.settings, database_url=mh.database_url, engine=engine, mode=mode,
                                 serving_ttl_s=3600, read_miss_rate=0) for mode in ("parallel", "routing")}
    searched, failures, stop = [], [], threading.Event()

    def search_all_along() -> None:  # a reader re-reading what serves every 0.1 s, searching without a pause
        with SegueReader(mh.settings, database_url=mh.database_url, engine=engine, mode="parallel",
                         serving_ttl_s=0.1, read_miss_rate=0) as reader:
            while not stop.is_set():
                try:
                    searched.append(reader.search(query, k=5).models)
                except Exception as error:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(error)

    try:
        # Their views (kept for an hour) name eta as the migration's other model.
        assert readers["parallel"].search(query, k=5).models == (BETA, "eta")
        assert readers["routing"].search(query, k=5).mode == "routing"
        searching = threading.Thread(target=search_all_along)
        searching.start()
        wait_for(lambda: (BETA, "eta") in searched, what="searches on both columns")
        with conn_of(mh) as conn:
            migration.abort(conn)
        wait_for(lambda: searched[-1] == (BETA,), what="searches after the abort")
        stop.set()
        searching.join()
        assert failures == []
        # The stale views find eta's column gone (or its counters) and look again.
        assert readers["parallel"].search(query, k=5).models == (BETA,)
        assert readers["routing"].search(query, k=5).models == (BETA,)
    finally:
        stop.set()
        for reader in readers.values():
            reader.close()
        engine.close()
    assert_dropped(mh, eta)
