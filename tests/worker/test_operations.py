"""Operating a worker from the outside: /metrics, /healthz, /readyz, heartbeats in SQL, dead-letter replay.

Every check goes through what an operator would use: a real HTTP client (httpx) and the
official Prometheus text parser on a running worker's endpoint, the ``segue`` command,
and the Grafana dashboard in ``deploy/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from segue.control import registry
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import ROOT, Harness, change, free_port, wait_for

OLD, NEW = "old-static", "new-tiny"


@pytest.fixture(scope="module")
def oh(tmp_path_factory, model_cache):
    h = Harness(tmp_path_factory.mktemp("operations"))
    h.env.update(SEGUE_METRICS_PORT=str(free_port()), SEGUE_HEARTBEAT_INTERVAL_S="1",
                 SEGUE_WORKER_LOST_AFTER_S="5")
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, NEW, str(modelfactory.tiny_transformer_a(model_cache)))
    yield h
    h.close()


def endpoint(h, worker) -> str:
    """The base URL the worker logged for its operations endpoint."""
    found = wait_for(lambda: re.search(r"metrics at (http://\S+)/metrics", h.worker_log(worker)), timeout=60,
                     interval=0.05, what="the worker to log its metrics URL")
    return found[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def first(oh):
    """The module's first worker, with whatever its /readyz said while it started."""
    worker = oh.start_worker()
    url = endpoint(oh, worker)
    answers = []

    def ready() -> bool:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            return False
        answers.append((response.status_code, response.json()))
        return response.status_code == 200

    wait_for(ready, timeout=120, interval=0.02, what="/readyz to pass")
    return worker, url, answers


def test_readyz_fails_while_models_load_and_passes_once_warm_and_assigned(first):
    worker, url, answers = first
    not_ready = [body for status, body in answers if status == 503]
    assert not_ready and not_ready[0]["models_warm"] is False, "no answer came before the models were warm"
    assert answers[-1][0] == 200
    body = answers[-1][1]
    assert body["models_warm"] and body["database"] and body["broker"] and body["partitions_assigned"]
    assert body["partitions"]  # this worker holds every partition
    health = httpx.get(f"{url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["engine_thread"] == "alive"


def test_metrics_move_by_exactly_what_was_processed(oh, first):
    _, url, _ = first
    before = scrape(url)
    docs = [f"metrics-{n}" for n in range(5)]
    changes = oh.settings.topic_document_changes
    oh.publish_changes(
        [(d, change(d, f"document {d} about enzymes", 2)) for d in docs]  # 5 embedded, both models
        + [(docs[0], change(docs[0], f"document {docs[0]} about enzymes", 1))]  # older: superseded
        + [("bad-1", b'{"doc_id": "bad-1", '), ("bad-2", b"\xff\xfe")]  # 2 bad_json
        + [("keyed-otherwise", change("other", "x", 1))]  # key_mismatch
    )
    wait_for(lambda: oh.scalar("SELECT count(*) FROM documents WHERE doc_id LIKE 'metrics-%%'") == 5,
             what="the documents")
    oh.publish_changes([(docs[1], change(docs[1], f"document {docs[1]} about enzymes", 3)),  # unchanged text
                        (docs[2], change(docs[2], None, 4, op="delete"))])  # deleted
    oh.publish_read_misses([(docs[3], orjson.dumps({"doc_id": docs[3], "model": "no-such-model"}))])

    def settled() -> dict | None:
        """The scrape once every published record's outcome is counted (11 changes, 1 read miss) and the
        coverage gauges, which the worker refreshes each heartbeat, have seen the documents."""
        after = scrape(url)
        counted = [value(after, name, **labels) - value(before, name, **labels) for name, labels in (
            ("segue_freshness_seconds_count", {"origin": "change"}),
            ("segue_freshness_seconds_count", {"origin": "read_miss"}),
            ("segue_batch_records_sum", {"topic": changes}))]
        covered = all(value(after, "segue_coverage_ratio", model=model) > 0 for model in (OLD, NEW))
        return after if counted == [11, 1, 11] and covered else None

    after = wait_for(settled, timeout=60, interval=0.5, what="every published record to be counted")

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    outcomes = [delta("segue_events_total", topic=changes, outcome=o, reason="")
                for o in ("embedded", "superseded", "unchanged", "deleted")]
    assert outcomes == [5, 1, 1, 1]
    assert delta("segue_events_total", topic=changes, outcome="dead_lettered", reason="bad_json") == 2
    assert delta("segue_events_total", topic=changes, outcome="dead_lettered", reason="key_mismatch") == 1
    assert delta("segue_dead_letters_produced_total", topic=changes, reason="bad_json") == 2
    assert delta("segue_events_total", topic=oh.settings.topic_read_misses, outcome="dead_lettered",
                 reason="unknown_model") == 1
    for model in (OLD, NEW):
        assert delta("segue_vectors_written_total", model=model) == 5
        assert delta("segue_texts_embedded_total", model=model) == 5
        assert delta("segue_tokens_embedded_total", model=model) >= 5 * 4
        assert delta("segue_embed_seconds_count", model=model) >= 1
        assert value(after, "segue_model_ready", model=model) == 1
        assert 0 < value(after, "segue_coverage_ratio", model=model) <= 1
    assert delta("segue_dead_letters_produced_total", topic=oh.settings.topic_read_misses, reason="unknown_model") == 1
    assert delta("segue_db_transaction_seconds_count") >= 2
    assert value(after, "segue_migration_state", state="none") == 1
    assert delta("segue_truncated_texts_total", model=NEW) == 0  # short texts, 128-token limit
    assert ("segue_engine_queue_chunks", (("priority", "change"),)) in after

    def caught_up() -> bool:
        lag = scrape(url)
        return any(name == "segue_consumer_lag_records" for name, _ in lag) and all(
            v == 0 for (name, _), v in lag.items() if name in ("segue_consumer_lag_records", "segue_consumer_lag_seconds"))

    wait_for(caught_up, timeout=30, interval=0.5, what="the lag gauges to say caught up")


def test_the_dashboard_uses_only_metrics_a_worker_exports(first):
    _, url, _ = first
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "segue.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in expressions for name in re.findall(r"\bsegue_[a-z_]+", expr)}
    exported = {name for name, _ in scrape(url)}
    assert len(used) >= 15 and used <= exported, f"not exported: {sorted(used - exported)}"


def test_status_shows_a_killed_worker_as_lost(oh, first):
    worker, _, _ = first
    second = oh.start_worker()
    wait_for(lambda: oh.scalar("SELECT count(*) FROM workers WHERE pid = %s AND state = 'ready'", (second.pid,)),
             timeout=120, what="the second worker's heartbeat")
    listed = oh.segue("status").stdout
    assert f":{second.pid}:" in listed and f":{worker.pid}:" in listed
    oh.stop_worker(second, sig=signal.SIGKILL)
    killed_at = time.monotonic()

    def lost() -> str | None:
        out = oh.segue("status").stdout
        line = next((ln for ln in out.splitlines() if f":{second.pid}:" in ln), "")
        return out if "lost" in line else None

    out = wait_for(lost, timeout=60, interval=1, what="status to show the killed worker lost")
    assert time.monotonic() - killed_at < 5 + 10  # the expiry, plus a beat and a command's start-up
    survivor = next(ln for ln in out.splitlines() if f":{worker.pid}:" in ln)
    assert "live" in survivor and "ready" in survivor


def test_dead_letters_are_replayed_once_their_cause_is_fixed(oh, first, model_cache):
    docs = [f"metrics-{n}" for n in (0, 3, 4)]
    oh.publish_read_misses([(d, orjson.dumps({"doc_id": d, "model": "later"})) for d in docs])
    listed = wait_for(lambda: (out := oh.segue("dlq", "list", "--reason", "unknown_model").stdout).count("'later'") >= 3
                      and out, timeout=60, what="three dead letters for the model 'later'")
    assert "read-misses/" in listed
    with connections.connect(oh.settings, oh.database_url) as conn:
        later = registry.register_model(conn, "later", str(modelfactory.tiny_transformer_b(model_cache)))
    dry = oh.segue("dlq", "replay", "--reason", "unknown_model", "--dry-run").stdout
    assert "would replay 4 letter(s)" in dry  # three for 'later', one for 'no-such-model' of the metrics test
    replayed = oh.segue("dlq", "replay", "--reason", "unknown_model", "--doc-id", docs[0]).stdout
    assert "replayed 1 letter(s); 0 replayed before" in replayed
    replayed = oh.segue("dlq", "replay", "--reason", "unknown_model").stdout
    assert "replayed 3 letter(s); 1 replayed before" in replayed
    current = sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {} = content_sha256").format(
        model_columns.sha_column(later.version))
    wait_for(lambda: oh.scalar(current, (docs,)) == 3, timeout=60, what="the replayed read misses embedded")
    # The 'no-such-model' miss, replayed, failed again: its new letter is reported, not replayed in a loop.
    again = wait_for(lambda: "1 failed again" in (out := oh.segue("dlq", "replay", "--reason", "unknown_model").stdout)
                     and out, timeout=60, what="the failed replay's letter")
    assert "replayed 0 letter(s); 4 replayed before; 1 failed again after a replay" in again


ENGINE_HOOK_SCRIPT = """
import os, threading, time, faust
from segue.devtools import services
from segue.worker import ops
from segue.agents.worker import create_app
from segue.embedding.engine import EmbeddingEngine, _Job
from segue.settings import load_settings
settings = load_settings()
engine = EmbeddingEngine(device="cpu")
url = services.database_url(settings)
state = ops.WorkerState(engine, url, services.kafka_bootstrap(settings))
state.models_warm = True
print("URL", ops.serve(state, "127.0.0.1", settings.metrics_port), flush=True)
app = create_app(settings, database_url=url, engine=engine, state=state, metrics_url=None)
def test_hook():  # once the flag file exists, the engine thread ends as if something had killed it
    while not os.path.exists(os.environ["SEGUE_TEST_KILL_ENGINE"]):
        time.sleep(0.05)
    engine._jobs.put(_Job(-1, -1, None, None))
threading.Thread(target=test_hook, daemon=True).start()
faust.Worker(app, loglevel="info", override_logging=False).execute_from_commandline()
"""


def test_a_dead_engine_thread_fails_healthz_and_stops_the_worker(oh, tmp_path):
    flag = tmp_path / "kill-the-engine"
    env = {**oh.env, "SEGUE_GROUP_ID": "segue-engine-hook", "SEGUE_METRICS_PORT": str(free_port()),
           "SEGUE_TEST_KILL_ENGINE": str(flag)}
    process = subprocess.Popen([sys.executable, "-c", ENGINE_HOOK_SCRIPT, "worker"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = process.stdout.readline().split()[1]
        assert wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, what="/healthz ok")
        flag.touch()
        failing = wait_for(lambda: (r := httpx.get(f"{url}/healthz", timeout=5)).status_code == 503 and r.json(),
                           timeout=10, interval=0.02, what="/healthz to fail")
        assert failing["engine_thread"] == "gone"
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "the embedding engine's thread is gone; stopping the worker" in output
    assert os.environ.get("SEGUE_TEST_KILL_ENGINE") is None  # the hook exists only in this test's script


def test_status_watch_refreshes_until_interrupted(oh, first):
    watching = subprocess.Popen([sys.executable, "-m", "segue.cli", "status", "--watch", "--every", "0.5"],
                                env=oh.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # start-up, then several refreshes
    watching.send_signal(signal.SIGINT)
    output, errors = watching.communicate(timeout=30)
    assert watching.returncode == 0, errors
    for title in ("migration_progress", "freshness, last 5 min", "workers (lost after 5 s of silence)"):
        assert title in output
