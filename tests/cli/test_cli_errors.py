"""The CLI's one error boundary: each mistake a new user makes prints one line saying what to do, and exits 1.

Every case runs the installed ``segue`` against real services: the session's embedded
PostgreSQL (a role with a password for the wrong-password case), ports nobody listens on
for a database or broker that refuses connections, and a data directory whose embedded
services were never started.
"""

from __future__ import annotations

import subprocess
from importlib import metadata

import pytest
from psycopg import conninfo, sql

from tests.harness import free_port, run_segue

PASSWORD = "Rx7-right-pass"


def one_line(done: subprocess.CompletedProcess) -> str:
    """The single line a failed command printed on stderr (it must exit 1, print nothing else there, no traceback)."""
    assert done.returncode == 1, f"exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def refused_database() -> str:
    """A PostgreSQL URL on a port nobody listens on."""
    return f"postgresql://segue@127.0.0.1:{free_port()}/segue"


@pytest.fixture(scope="module")
def password_role(harness) -> str:
    """A role that must log in with a password (only this role: the server trusts every other one)."""
    pgdata = harness.settings.data_dir / "services" / "pgdata"
    hba = pgdata / "pg_hba.conf"
    hba.write_text("local all segue_pw scram-sha-256\n" + hba.read_text())
    harness.conn.execute(sql.SQL("CREATE ROLE segue_pw LOGIN PASSWORD {}").format(sql.Literal(PASSWORD)))
    harness.conn.execute("SELECT pg_reload_conf()")
    return "segue_pw"


@pytest.mark.parametrize("command", [
    ("models", "add", "minilm-static", "--source", "./models/static-256"),
    ("migrate", "plan", "--to", "minilm-l6", "--source", "./models/all-MiniLM-L6-v2"),
], ids=["models-add", "migrate-plan"])
def test_a_model_folder_that_does_not_exist_names_the_bundled_models(harness, command):
    line = one_line(harness.segue(*command, check=False))
    assert f"model source {command[-1]!r}" in line
    assert "bundled:minilm-static-256" in line and "bundled:all-minilm-l6-v2" in line


def test_a_database_that_refuses_connections(harness, refused_database):
    line = one_line(harness.segue("models", "list", env={**harness.env, "SEGUE_DATABASE_URL": refused_database},
                                  check=False))
    assert line.startswith("Error: cannot reach the database") and "Connection refused" in line
    assert "SEGUE_DATABASE_URL" in line


def test_a_malformed_database_url_never_shows_its_password(harness):
    done = harness.segue("status", env={**harness.env, "SEGUE_DATABASE_URL": "postgresql://segue:Hunter2x@[::1/db"},
                         check=False)
    line = one_line(done)
    assert "SEGUE_DATABASE_URL is not a PostgreSQL URL" in line
    assert "Hunter2x" not in done.stdout + done.stderr


def test_a_wrong_password(harness, password_role):
    url = conninfo.make_conninfo(harness.database_url, user=password_role, password="Wr0ng-guess")
    done = harness.segue("models", "list", env={**harness.env, "SEGUE_DATABASE_URL": url}, check=False)
    line = one_line(done)
    assert f'password authentication failed for user "{password_role}"' in line
    assert "check the user and password in SEGUE_DATABASE_URL" in line
    assert "Wr0ng-guess" not in done.stdout + done.stderr
    right = conninfo.make_conninfo(harness.database_url, user=password_role, password=PASSWORD)
    status = harness.segue("services", "status", env={**harness.env, "SEGUE_DATABASE_URL": right}).stdout
    assert "postgresql  running" in status  # the same role logs in with its password


@pytest.mark.parametrize("command", [("dlq", "list"), ("publish", "{file}"), ("worker",)],
                         ids=["dlq-list", "publish", "worker"])
def test_an_unreachable_broker(harness, tmp_path, command):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "never sent"}\n')
    address = f"127.0.0.1:{free_port()}"
    done = harness.segue(*(part.format(file=corpus) for part in command), check=False,
                         env={**harness.env, "SEGUE_KAFKA_URL": f"kafka://{address}"})
    line = one_line(done)  # no "Unclosed AIOKafka…" warnings, no client log lines
    assert f"cannot reach the Kafka broker at {address}" in line and "SEGUE_KAFKA_URL" in line


def test_a_worker_started_with_the_database_down(harness, refused_database):
    done = harness.segue("worker", env={**harness.env, "SEGUE_DATABASE_URL": refused_database}, check=False)
    assert "cannot reach the database" in one_line(done)


def test_embedded_services_that_were_never_started_are_not_started_by_other_commands(tmp_path, harness):
    env = {**harness.env, "SEGUE_DATA_DIR": str(tmp_path)}
    assert "start it with segue services up" in one_line(run_segue("worker", env=env, check=False))
    assert "start it with segue services up" in one_line(run_segue("status", env=env, check=False))
    assert not (tmp_path / "services" / "pgdata" / "postmaster.pid").exists()
    listed = run_segue("services", "status", env=env).stdout
    assert "postgresql  stopped" in listed and "kafka       stopped" in listed


def test_a_setting_that_does_not_parse(harness):
    line = one_line(harness.segue("status", env={**harness.env, "SEGUE_BATCH_SIZE": "lots"}, check=False))
    assert "SEGUE_BATCH_SIZE" in line and "'lots'" in line


def test_an_unknown_model_says_how_to_register_it(harness):
    line = one_line(harness.segue("migrate", "start", "--to", "no-such-model", check=False))
    assert "no model named 'no-such-model'" in line and "segue models add no-such-model --source" in line


@pytest.mark.parametrize("debug", [("--debug",), ()], ids=["--debug", "SEGUE_LOG_LEVEL"])
def test_debug_shows_the_traceback(harness, refused_database, debug):
    env = {**harness.env, "SEGUE_DATABASE_URL": refused_database}
    if not debug:
        env["SEGUE_LOG_LEVEL"] = "debug"
    done = harness.segue(*debug, "models", "list", env=env, check=False)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "psycopg.OperationalError" in done.stderr


def test_version(harness):
    assert run_segue("--version", env=harness.env).stdout == f"segue {metadata.version('segue')}\n"


def test_help_shows_a_percent_sign_once(harness):
    shown = run_segue("migrate", "start", "--help", env=harness.env).stdout
    assert "coverage % the cutover waits for" in shown and "%%" not in shown
