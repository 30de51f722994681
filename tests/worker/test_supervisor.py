"""``segue worker --processes 2``: two Faust workers under one supervisor, one endpoint, restarts, shutdown.

Everything goes through what an operator has: the command, its one endpoint (httpx and the
official Prometheus parser), the ``workers`` table and signals.
"""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from segue.control import registry
from segue.storage import connections
from tests import modelfactory
from tests.harness import Harness, change, free_port, wait_for

MODEL = "static-a"


@pytest.fixture(scope="module")
def sh(tmp_path_factory, model_cache):
    h = Harness(tmp_path_factory.mktemp("supervisor"))
    h.env.update(SEGUE_WORKER_PROCESSES="2", SEGUE_METRICS_PORT=str(free_port()), SEGUE_HEARTBEAT_INTERVAL_S="1")
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, MODEL, str(modelfactory.tiny_static(model_cache)))
    yield h
    h.close()


def ready(url: str) -> dict | None:
    """The supervisor's /readyz report when it says ready (200), else None."""
    response = httpx.get(f"{url}/readyz", timeout=30)
    return response.json() if response.status_code == 200 else None


def embedded_events(url: str) -> float:
    """The supervisor's sum over its workers of change events embedded."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "segue_events_total" and sample.labels.get("outcome") == "embedded"
               and sample.labels.get("topic") == "document-changes")


def beating(h: Harness, pids: set[int]) -> None:
    """Wait for each of ``pids`` to report itself in the ``workers`` table."""
    wait_for(lambda: {pid for pid, in h.sql("SELECT pid FROM workers WHERE pid = ANY(%s)", (list(pids),))} == pids,
             timeout=30, what="each worker's heartbeat in SQL")


def all_embedded(h: Harness, prefix: str, count: int) -> bool:
    return h.scalar("SELECT count(*) FROM migration_changelog WHERE action = 'embedded' AND doc_id LIKE %s",
                    (f"{prefix}-%",)) == count


def test_two_workers_share_the_partitions_restart_alone_and_stop_together(sh):
    supervisor = sh.start_worker()
    url = wait_for(lambda: re.search(r"their metrics at (http://\S+)/metrics", sh.worker_log(supervisor)),
                   timeout=60, what="the supervisor to log its endpoint")[1]

    # One /readyz for both: ready once each worker has loaded its models and holds partitions.
    before = wait_for(lambda: ready(url), timeout=180, interval=1.0, what="both workers ready")
    assert before["processes"] == 2 and len(before["workers"]) == 2
    pids = {worker["pid"] for worker in before["workers"]}
    assert len(pids) == 2 and supervisor.pid not in pids
    held = [set(worker["partitions"]) for worker in before["workers"]]
    changes = {f"document-changes/{p}" for p in range(2)}
    assert not held[0] & held[1] and changes <= held[0] | held[1]  # Kafka split the topics between them

    sh.publish_changes([(f"a-{n}", change(f"a-{n}", f"text number {n}", 1)) for n in range(200)])
    wait_for(lambda: all_embedded(sh, "a", 200), timeout=120, what="every change embedded by the pair")
    assert wait_for(lambda: embedded_events(url) == 200, timeout=30, what="the summed counter") is True
    beating(sh, pids)

    # One worker dies: only it is restarted, and the pair carries on.
    victim = before["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: (report := ready(url)) and report["workers"][0]["pid"] != victim and report,
                     timeout=180, interval=1.0, what="the killed worker restarted and ready")
    assert after["workers"][0]["restarts"] == 1 and after["workers"][1]["restarts"] == 0
    assert after["workers"][1]["pid"] == before["workers"][1]["pid"]
    survivors = {worker["pid"] for worker in after["workers"]}
    beating(sh, survivors)
    sh.publish_changes([(f"b-{n}", change(f"b-{n}", f"later text {n}", 1)) for n in range(50)])
    wait_for(lambda: all_embedded(sh, "b", 50), timeout=120, what="changes after the restart embedded")

    # SIGTERM stops both workers (each says so in SQL) and then the supervisor, with status 0.
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    for pid in survivors:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    states = dict(sh.sql("SELECT pid, state FROM workers WHERE pid = ANY(%s)", (list(survivors),)))
    assert states == {pid: "stopped" for pid in survivors}
