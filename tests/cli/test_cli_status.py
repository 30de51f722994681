"""What the CLI says about the state of things, and the small things a user notices.

A module-scoped set of embedded services holds two models and a corpus written with its
vectors (no worker: coverage is set by the test), so each state the messages describe
(index waiting, covered but not built, built; a forced cutover; an interrupted backfill)
is reached exactly. Tables are rendered to an 80-column console and read back.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from psycopg import sql
from rich.console import Console

from segue.cli.views import progress_table, status_view
from segue.control import registry
from segue.devtools.corpus import CorpusDocument, store_embedded
from segue.storage import connections, model_columns
from segue.worker import heartbeat
from tests import modelfactory
from tests.harness import SEGUE, Harness, free_port, run_segue, wait_for

OLD, NEW = "static-distilled-old", "transformer-new-32d"  # long enough to be cut at 80 columns if nothing folds
DOCS = 40
COVERED = 37  # of DOCS, with a NEW vector: 92.5 %, under the 95 % the index waits for


def unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def sh(tmp_path_factory, model_cache):
    h = Harness(tmp_path_factory.mktemp("status"))
    with connections.connect(h.settings, h.database_url) as conn:
        old = registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        new = registry.register_model(conn, NEW, str(modelfactory.tiny_transformer_a(model_cache)))
        docs = [CorpusDocument(f"d-{n:03d}", f"abstract {n}: cells divide") for n in range(DOCS)]
        store_embedded(conn, docs[:COVERED], {old: unit_vectors(COVERED, old.dim, 1),
                                              new: unit_vectors(COVERED, new.dim, 2)})
        store_embedded(conn, docs[COVERED:], {old: unit_vectors(DOCS - COVERED, old.dim, 3)})
    h.models = (old, new)
    yield h
    h.close()


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def fill_new_vectors(h: Harness) -> None:
    """Give every document a current NEW vector (what workers would do)."""
    _, new = h.models
    missing = [doc_id for (doc_id,) in h.sql(sql.SQL("SELECT doc_id FROM documents WHERE {} IS NULL ORDER BY doc_id")
                                             .format(model_columns.vector_column(new.version)))]
    for doc_id, vector in zip(missing, unit_vectors(len(missing), new.dim, 4), strict=True):
        h.sql(sql.SQL("UPDATE documents SET {} = %s, {} = content_sha256 WHERE doc_id = %s RETURNING 1").format(
            model_columns.vector_column(new.version), model_columns.sha_column(new.version)), (vector, doc_id))


def hnsw_line(h: Harness) -> str:
    return next(line for line in h.segue("migrate", "status").stdout.splitlines() if line.startswith("HNSW index:"))


def test_migrate_index_below_the_threshold_says_so_and_builds_only_with_now(sh):
    assert "migration 1 started" in sh.segue("migrate", "start", "--to", NEW).stdout
    assert "waits for 95% coverage (now 92.5%)" in hnsw_line(sh)
    line = one_line(sh.segue("migrate", "index", check=False))
    assert "92.50% < 95%" in line and "segue migrate index --now" in line
    assert sh.scalar("SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%%hnsw'") == 0
    assert "built with maintenance_work_mem" in sh.segue("migrate", "index", "--now").stdout
    assert hnsw_line(sh).endswith("is built")


def test_an_index_whose_coverage_is_enough_is_not_said_to_wait(sh):
    _, new = sh.models
    sh.conn.execute(sql.SQL("DROP INDEX {}").format(model_columns.index_name(sh.conn, new.version)))  # as if never built
    fill_new_vectors(sh)
    line = hnsw_line(sh)
    assert "is not built yet: coverage 100.0% is enough" in line and "waits" not in line
    assert "built with maintenance_work_mem" in sh.segue("migrate", "index").stdout


def test_plan_prices_the_device_it_measured(sh):
    planned = sh.segue("migrate", "plan", "--to", NEW, "--sample", "4").stdout
    assert "on cpu" in planned and "/CPU-hour (SEGUE_GPU_HOUR_USD)" in planned and "GPU-hour" not in planned


def test_a_forced_cutover_says_it_was_forced_and_why(sh):
    forced = sh.segue("migrate", "cutover", "--force", "--reason", "no labels yet").stdout
    assert f"reads now use {NEW}" in forced
    assert "forced past a closed gate (no quality verdict" in forced and "no labels yet" in forced
    assert f"reads back on {OLD}" in sh.segue("migrate", "rollback").stdout


def test_no_judged_document_hints_at_the_prefix(sh, tmp_path):
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "do cells divide?"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t000\t1\n")  # stored as d-000
    line = one_line(sh.segue("eval", "--beir", str(tmp_path), "--models", f"{OLD},{NEW}", check=False))
    assert "no query of beir:" in line and "--doc-id-prefix" in line


def test_an_interrupted_backfill_says_it_resumes_and_does(sh):
    old, _ = sh.models
    docs = [CorpusDocument(f"late-{n}", f"a late abstract {n}") for n in range(3)]
    with connections.connect(sh.settings, sh.database_url) as conn:
        store_embedded(conn, docs, {old: unit_vectors(len(docs), old.dim, 5)})
    # One document a page, the second held 100 s by the pace: interrupted while it waits.
    backfill = subprocess.Popen([SEGUE, "backfill", "--rate", "0.01", "--page-size", "1"], env=sh.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sh.scalar("SELECT published FROM backfill_progress") == 1, what="the first page enqueued")
        backfill.send_signal(signal.SIGINT)
        out, err = backfill.communicate(timeout=60)
    finally:
        if backfill.poll() is None:
            backfill.kill()
    assert backfill.returncode == 130 and "Traceback" not in err, err
    assert "run segue backfill again to resume after the last acknowledged page" in out
    resumed = sh.segue("backfill").stdout
    assert "published 2 documents" in resumed and "backfill complete" in resumed
    assert f"backfill {NEW}: enqueued" in resumed


def test_a_second_name_for_the_same_model_warns(sh, model_cache):
    done = sh.segue("models", "add", "twin", "--source", str(modelfactory.tiny_static(model_cache)))
    assert f"has the fingerprint of live model '{OLD}' (v1)" in done.stderr
    assert "registered twin as v3" in done.stdout


def rendered(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def test_status_fits_80_columns_and_shows_a_stopped_worker(sh):
    async def beat(worker_id: str, *, stop: bool) -> None:
        conn = await connections.connect_async(sh.settings, sh.database_url)
        async with conn:
            await heartbeat.beat(conn, heartbeat.Beat(
                worker_id=worker_id, started_at=datetime.now(timezone.utc), state="ready",
                partitions=[f"document-changes/{p}" for p in range(4)], lag={"document-changes/0": 12},
                models=[OLD, NEW], device="cpu", events_per_s=12.5, metrics_url="http://127.0.0.1:9464",
                halted={}))
            if stop:
                await heartbeat.stopped(conn, worker_id)

    running, stopped = "build-host-17.example.internal:4242:20261203T101500", "build-host-18:77:20261203T101500"
    asyncio.run(beat(running, stop=False))
    asyncio.run(beat(stopped, stop=True))
    with connections.connect(sh.settings, sh.database_url, read_only=True) as conn:
        lines = rendered(status_view(conn, sh.settings, width=80), 80)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80 and "…" not in text
    for name in (OLD, NEW, "coverage %", "ETA"):
        assert name in text
    assert "build-host-17.example.intern" in text and "al:4242:20261203T101500" in text  # folded, not cut
    status_of = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in lines if ln.startswith("│ build-host")}
    assert status_of == {"build-host-17.example.intern": "live", "build-host-18:77:20261203T10": "stopped"}


@pytest.mark.parametrize("width", [80, 120])
def test_progress_keeps_model_names_and_the_eta_whole(width):
    row = {"model_version": 12, "model": "minilm-static-256", "dim": 256, "serving_reads": True,
           "total_documents": 1_000_000, "current_vectors": 543_210, "stale_vectors": 1_234, "missing_vectors": 455_556,
           "coverage_pct": 54.32, "vectors_last_5m": 98_765, "rate_per_s": 329.22,
           "eta": timedelta(hours=12, minutes=34, seconds=56), "failures_24h": 17, "truncated_documents": 1_024}
    text = "\n".join(lines := rendered(progress_table([row, {**row, "model": "minilm-l6"}], width=width), width))
    assert max(map(len, lines)) <= width and "…" not in text
    assert "minilm-static-256" in text and "12:34:56" in text and "54.32" in text
    if width == 120:
        assert "failures 24h" in text  # the wider console shows more


def test_status_says_stopped_services_are_down_instead_of_starting_them(tmp_path, sh):
    env = {**sh.env, "SEGUE_DATA_DIR": str(tmp_path), "SEGUE_EMBEDDED_KAFKA_PORT": str(free_port())}
    try:
        run_segue("services", "up", env=env)
        stopped = run_segue("services", "down", env=env).stdout
        assert "postgresql  stopped" in stopped and "kafka       stopped" in stopped
        assert "start it with segue services up" in one_line(run_segue("status", env=env, check=False))
        still = run_segue("services", "status", env=env).stdout
        assert "postgresql  stopped" in still and "kafka       stopped" in still
    finally:
        run_segue("services", "down", env=env)


def test_services_status_tries_external_services(sh):
    env = {**sh.env, "SEGUE_DATABASE_URL": f"postgresql://segue@127.0.0.1:{free_port()}/segue",
           "SEGUE_KAFKA_URL": f"kafka://127.0.0.1:{free_port()}"}
    listed = run_segue("services", "status", env=env).stdout
    assert "postgresql  unreachable" in listed and "Connection refused" in listed
    assert "kafka       unreachable" in listed
    reachable = run_segue("services", "status", env={**sh.env, "SEGUE_DATABASE_URL": sh.database_url,
                                                     "SEGUE_KAFKA_URL": f"kafka://{sh.bootstrap}"}).stdout
    assert "postgresql  running" in reachable and "kafka       running" in reachable


def test_publish_takes_id_and_text_by_default(sh, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": "p-1", "text": "first"}\n{"id": "p-2", "text": "second"}\n')
    assert "sent 2 document change(s) to document-changes" in sh.segue("publish", str(corpus)).stdout
    beir = tmp_path / "corpus.jsonl"
    beir.write_text('{"_id": "p-3", "title": "", "text": "third"}\n{"_id": "p-4", "title": "", "text": "fourth"}\n')
    assert "sent 2 document change(s)" in sh.segue("publish", str(beir)).stdout
    missing = sh.segue("publish", str(beir), "--id-field", "id", check=False)
    assert missing.returncode == 1 and "line 1: no id" in missing.stdout
