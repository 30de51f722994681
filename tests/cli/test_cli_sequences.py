"""The README's command sequences, run as a user and as an operator would: subprocesses of the installed ``segue``.

* "Using it" on embedded services: services up, models add, worker, publish, migrate
  plan / start / status, backfill, cutover refused then forced with a reason, rollback,
  cutover, finish, services down.
* Production start-up: external ``SEGUE_*`` URLs, an empty HOME and no data directory,
  and a database role that is not a superuser (the ``vector`` extension created
  beforehand by an administrator); its password never printed or logged.
"""

from __future__ import annotations

import os
import signal

import psycopg
import pytest
from psycopg import sql

from segue.storage import connections, upgrades
from tests import modelfactory
from tests.harness import Harness, change, harness_env, run_segue, wait_for

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


def test_the_readme_sequence_on_embedded_services(tmp_path, model_cache):
    env = harness_env(tmp_path / "segue")
    (tmp_path / "segue").mkdir()
    h = None
    try:
        started = run_segue("services", "up", env=env).stdout
        assert "postgresql  running" in started and "kafka       running" in started
        h = Harness(tmp_path / "segue", env)  # attaches to what `services up` started
        with connections.connect(h.settings, h.database_url) as conn:
            run_lifecycle(h, conn, env, model_cache, docs=40)
        stopped = h.segue("services", "down").stdout
        assert "postgresql  stopped" in stopped and "kafka       stopped" in stopped
    finally:
        if h is not None:
            h.close()


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
