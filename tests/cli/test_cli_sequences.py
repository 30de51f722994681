"""The README's command sequences, run as a user and as an operator would: subprocesses of the installed ``segue``.

* "Using it", verbatim: the block is read from README.md and each command run as written,
  in a folder holding ``./my-data`` (a BEIR set cut from the bundled SciFact), on embedded
  services, with the bundled models. ``segue worker`` runs in the background, and the test
  waits between commands where a user would (the corpus embedded before the plan).
* Production start-up: external ``SEGUE_*`` URLs, an empty HOME and no data directory,
  and a database role that is not a superuser (the ``vector`` extension created
  beforehand by an administrator); its password never printed or logged. It runs the
  lifecycle with tiny models: models add, worker, publish, migrate plan / start / status,
  backfill, cutover refused then forced with a reason, rollback, cutover, finish.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import signal
import subprocess
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from segue.devtools import services
from segue.devtools.modelkit import distill_static, minilm_path
from segue.settings import Settings
from segue.storage import connections, upgrades
from tests import modelfactory
from tests.harness import ROOT, SEGUE, Harness, change, harness_env, wait_for

pytestmark = pytest.mark.drill

PASSWORD = "Pr0d-s3cret-9f2c"


def corpus(prefix: str, count: int) -> list[tuple[str, bytes]]:
    return [(f"{prefix}-{n:03d}", change(f"{prefix}-{n:03d}", f"abstract {n}: proteins fold and cells divide", 1))
            for n in range(count)]


def coverage(conn: psycopg.Connection, model: str) -> float:
    row = conn.execute("SELECT coverage_pct FROM migration_progress WHERE model = %s", (model,)).fetchone()
    return float(row[0] or 0) if row else 0.0


def run_lifecycle(h: Harness, conn: psycopg.Connection, env: dict[str, str], model_cache, docs: int) -> list[str]:
    """models add → worker → publish → migrate plan/start/status → backfill → cutover (refused, forced) →
    rollback → cutover → finish; returns everything the commands printed."""
    printed = []

    def segue(*args: str, check: bool = True):
        done = h.segue(*args, env=env, check=check)
        printed.append(done.stdout + done.stderr)
        return done

    segue("models", "add", "old", "--source", str(modelfactory.tiny_static(model_cache)))
    worker = h.start_worker(env)
    h.publish_changes(corpus("doc", docs))
    wait_for(lambda: conn.execute("SELECT count(*) FROM documents").fetchone()[0] == docs
             and coverage(conn, "old") == 100.0, timeout=120, what="the corpus on the old model")
    new_source = str(modelfactory.tiny_transformer_a(model_cache))
    plan = segue("migrate", "plan", "--to", "new", "--source", new_source, "--sample", "8").stdout
    assert f"documents to embed: {docs}" in plan
    assert "migration 1 started: old → new" in segue("migrate", "start", "--to", "new", "--source", new_source).stdout
    assert "running" in segue("migrate", "status").stdout
    assert "backfill complete" in segue("backfill", "--rate", "500").stdout
    wait_for(lambda: coverage(conn, "new") == 100.0, timeout=120, what="the backfill embedded")
    refused = segue("migrate", "cutover", check=False)
    assert refused.returncode == 1 and "cutover refused" in refused.stderr and "no quality verdict" in refused.stderr
    assert "reads now use new" in segue("migrate", "cutover", "--force", "--reason", "drill: no labels yet").stdout
    assert "reads back on old" in segue("migrate", "rollback").stdout
    assert "reads now use new" in segue("migrate", "cutover", "--force", "--reason", "drill: again").stdout
    assert "old retired" in segue("migrate", "finish", "--grace", "0").stdout
    assert conn.execute("SELECT state FROM migrations").fetchone()[0] == "finished"
    (forced,) = conn.execute("SELECT detail->>'reason' FROM migration_changelog WHERE action = 'migration_cut_over'"
                             " ORDER BY id LIMIT 1").fetchone()
    assert forced == "drill: no labels yet"
    h.publish_changes([("after-finish", change("after-finish", "only the new model now", 1))])
    wait_for(lambda: conn.execute("SELECT count(*) FROM migration_changelog WHERE doc_id = 'after-finish'")
             .fetchone()[0] == 1, what="a change after finish, on one model")
    assert "new" in segue("status").stdout
    h.stop_worker(worker, sig=signal.SIGTERM)
    assert worker.returncode == 0, h.worker_log(worker)[-3000:]
    printed.append(h.worker_log(worker))
    return printed


def readme_commands() -> list[list[str]]:
    """The commands of README.md's "Using it" block, each split as a shell would (comments dropped)."""
    section = (ROOT / "README.md").read_text().split("\n## Using it\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def write_beir_set(folder: Path, queries: int, documents: int) -> tuple[int, int]:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) from the bundled SciFact: the first ``queries``
    judged queries, their judged abstracts and others up to ``documents``; (documents, queries) written."""
    scifact = resources.files("segue.devtools").joinpath("data/scifact")
    qrels = [line.split("\t") for line in scifact.joinpath("qrels.tsv").read_text().splitlines()[1:]]
    with scifact.joinpath("corpus.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as lines:
        corpus = {record["_id"]: record for record in map(json.loads, lines)
                  if len(record["text"].encode()) < 3000}  # under the harness's limit on a text
    chosen: dict[str, set[str]] = {}
    for query_id, doc_id, _ in qrels:
        if doc_id in corpus and (query_id in chosen or len(chosen) < queries):
            chosen.setdefault(query_id, set()).add(doc_id)
    judged = {doc_id for docs in chosen.values() for doc_id in docs}
    kept = sorted(judged) + [doc_id for doc_id in corpus if doc_id not in judged][: documents - len(judged)]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(corpus[d]) + "\n" for d in kept))
    wanted = [json.loads(line) for line in scifact.joinpath("queries.jsonl").read_text().splitlines()]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in wanted if q["_id"] in chosen))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, docs in chosen.items() for d in sorted(docs)))
    return len(kept), len(chosen)


def test_the_readme_using_it_block_as_written(tmp_path, model_cache):
    commands = readme_commands()
    assert [c[:3] for c in commands] == [
        ["segue", "services", "up"], ["segue", "db", "upgrade"], ["segue", "models", "add"], ["segue", "worker"],
        ["segue", "publish", "./my-data/corpus.jsonl"], ["segue", "migrate", "plan"], ["segue", "migrate", "start"],
        ["segue", "backfill", "--rate"], ["segue", "migrate", "status"], ["segue", "migrate", "index"],
        ["segue", "eval", "--beir"], ["segue", "migrate", "cutover"], ["segue", "migrate", "rollback"],
        ["segue", "migrate", "cutover"], ["segue", "migrate", "finish"]], "the README's block changed: update this test"
    docs, queries = write_beir_set(tmp_path / "my-data", queries=40, documents=100)
    assert queries == 40 and docs == 100
    env = harness_env(tmp_path / "segue")
    # The demo's old model, distilled once per test session (as the quality tests do), where the CLI caches it.
    static = distill_static(str(minilm_path()), model_cache / "minilm-static-256", dims=256)
    (tmp_path / "segue" / "models").mkdir(parents=True)
    (tmp_path / "segue" / "models" / "minilm-static-256").symlink_to(static, target_is_directory=True)
    worker = None

    def segue(words: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([SEGUE, *words[1:]], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert "Traceback" not in done.stderr and "pyrate_limiter" not in done.stderr, done.stderr
        if check:
            assert done.returncode == 0, f"{shlex.join(words)} exited {done.returncode}:\n{done.stderr}"
        return done

    (up, upgrade, add, start_worker, publish, plan, start, backfill, migrate_status, index, evaluate, cutover,
     rollback, forced, finish) = commands
    try:
        assert "postgresql  running" in segue(up).stdout
        assert "the database is at schema version" in segue(upgrade).stdout
        settings = Settings(data_dir=tmp_path / "segue", embedded_kafka_port=int(env["SEGUE_EMBEDDED_KAFKA_PORT"]))
        conn = connections.connect(settings, services.database_url(settings, start=False))
        assert "registered minilm-static as v1: static, 256-d" in segue(add).stdout
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([SEGUE, *start_worker[1:]], env=env, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
        assert f"sent {docs} document change(s)" in segue(publish).stdout  # _id and text, BEIR's fields
        wait_for(lambda: coverage(conn, "minilm-static") == 100.0 and conn.execute(
            "SELECT count(*) FROM documents").fetchone()[0] == docs, timeout=180, what="the corpus on the old model")
        assert f"documents to embed: {docs}" in segue(plan).stdout
        assert "migration 1 started: minilm-static → minilm-l6" in segue(start).stdout
        waited = segue(backfill).stdout
        assert "backfill complete" in waited and f"every document has a current minilm-l6 vector ({docs}/{docs})" \
            in waited
        shown = segue(migrate_status).stdout
        assert "migration 1: minilm-static → minilm-l6, running" in shown and "waits" not in shown
        indexed = segue(index).stdout
        assert "built with maintenance_work_mem" in indexed or "already exists" in indexed  # or a worker built it
        verdict = segue(evaluate).stdout
        assert verdict.startswith("pass:"), verdict
        assert "reads now use minilm-l6" in segue(cutover).stdout
        assert "reads back on minilm-static" in segue(rollback).stdout
        assert "the gate was open: nothing was forced" in segue(forced).stdout
        refused = segue(finish, check=False)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
        assert "the grace period is 1 day" in refused.stderr and "rollback stays possible" in refused.stderr
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        row = next(ln for ln in segue(["segue", "status"]).stdout.splitlines() if f":{worker.pid}:" in ln)
        assert " stopped " in row  # said so on its way out: neither live nor lost
        logged = (tmp_path / "worker.log").read_text()
        assert "\x1b[" not in logged and "\b" not in logged  # no terminal spinner in a log
        conn.close()
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        subprocess.run([SEGUE, "services", "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def infra(tmp_path_factory):
    """External PostgreSQL and Kafka, as an operator has them: a database owned by a role that is not superuser."""
    h = Harness(tmp_path_factory.mktemp("infra"))
    h.conn.execute(sql.SQL("CREATE ROLE segue_app LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
        sql.Literal(PASSWORD)))
    h.conn.execute("CREATE DATABASE segue_prod OWNER segue_app")
    admin_url = h.database_url.replace("/postgres?", "/segue_prod?")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("CREATE EXTENSION vector")  # what an administrator does once
    yield h, h.database_url.replace("postgres:@/postgres?", f"segue_app:{PASSWORD}@/segue_prod?")
    h.close()


def test_production_start_up_with_external_services_an_empty_home_and_no_superuser(infra, tmp_path, model_cache):
    h, app_url = infra
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGUE_", "XDG_"))}
    env.update(HOME=str(home), SEGUE_DATABASE_URL=app_url, SEGUE_KAFKA_URL=f"kafka://{h.bootstrap}",
               SEGUE_TOPIC_PARTITIONS="2", SEGUE_GROUP_ID="segue-prod", SEGUE_RETRY_BACKOFF_S="0.05",
               SEGUE_BATCH_TIMEOUT_S="0.2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    services = h.segue("services", "status", env=env).stdout
    assert "external (SEGUE_DATABASE_URL)" in services and "segue_app:***@" in services
    with psycopg.connect(app_url, autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        printed = run_lifecycle(h, conn, env, model_cache, docs=30)
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == upgrades.latest_schema_version()
    assert (home / ".local" / "share" / "segue" / "faust").is_dir()  # the worker made its state folder
    assert not (home / ".local" / "share" / "segue" / "services").exists()  # and no embedded service ran
    leaked = [text for text in printed if PASSWORD in text]
    assert not leaked, "the database password was printed or logged"
