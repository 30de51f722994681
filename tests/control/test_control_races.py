"""Control-plane commands racing each other, on embedded services of this module's own (no worker).

A cutover (or a worker marking the migration ready) waiting for the migration row's lock
must decide on the gate as it is once it has the lock; two ``segue dlq replay`` runs at
once must publish each letter once; a dead-lettered tombstone must be reported, never
replayed; letters keyed with what looks like console markup must be listed as they are.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from psycopg.types.json import Jsonb

from segue.control import dlq, migration, registry
from segue.schemas.events import (
    DeadLetterReason,
    SourcePosition,
    dead_letter_key,
    encode_dead_letter,
)
from segue.storage import connections
from tests import modelfactory
from tests.harness import Harness, wait_for

OLD, NEW = "race-old", "race-new"


@pytest.fixture(scope="module")
def rh(tmp_path_factory, model_cache):
    """A harness with two models registered, the first serving reads, and no worker."""
    h = Harness(tmp_path_factory.mktemp("races"))
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, OLD, str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, NEW, str(modelfactory.tiny_transformer_a(model_cache)))
    yield h
    h.close()


@pytest.fixture
def passing(rh):
    """A running migration from OLD to NEW whose gate passes: no coverage needed, a passing verdict recorded."""
    with connections.connect(rh.settings, rh.database_url) as conn:
        started = migration.start(conn, NEW, cutover_min_coverage_pct=0.0)
        record_verdict(conn, started, "pass")
        assert migration.gate(conn, started).passed
    yield started
    rh.conn.execute("DELETE FROM model_evaluations WHERE migration_id = %s", (started.id,))
    rh.conn.execute("DELETE FROM migrations WHERE id = %s", (started.id,))
    rh.conn.execute("UPDATE serving SET read_model_version = %s", (started.from_version,))


def record_verdict(conn, current: migration.Migration, verdict: str) -> None:
    """A verdict row as ``segue eval`` records it (the tiny models here have no quality to measure)."""
    conn.execute(
        "INSERT INTO model_evaluations (migration_id, kind, old_version, new_version, metric, old_value, new_value,"
        " verdict, detail) VALUES (%s, 'labelled', %s, %s, 'ndcg@10', 0.41, 0.40, %s, %s)",
        (current.id, current.from_version, current.to_version, verdict,
         Jsonb({"coverage": {"old": 100.0, "new": 100.0}})))


@pytest.mark.parametrize("step", [migration.cutover, migration.refresh], ids=["cutover", "refresh"])
def test_a_verdict_recorded_while_a_transition_waits_for_the_lock_closes_the_gate(rh, passing, step):
    outcome = {}
    with connections.connect(rh.settings, rh.database_url) as conn, connections.connect(rh.settings, rh.database_url) as other:

        def attempt() -> None:
            try:
                outcome["result"] = step(conn)
            except migration.MigrationError as error:
                outcome["result"] = error

        with other.transaction():
            other.execute("SELECT 1 FROM migrations WHERE id = %s FOR UPDATE", (passing.id,))
            waiting = threading.Thread(target=attempt)
            waiting.start()
            wait_for(lambda: other.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                           (conn.info.backend_pid,)).fetchone()[0],
                     what="the transition to wait for the migration row")
            record_verdict(other, passing, "fail")
        waiting.join()
        (state,) = other.execute("SELECT state FROM migrations WHERE id = %s", (passing.id,)).fetchone()
        (read,) = other.execute("SELECT read_model_version FROM serving").fetchone()
    assert (state, read) == ("running", passing.from_version)
    if step is migration.cutover:
        assert isinstance(outcome["result"], migration.MigrationError)
        assert "cutover refused: the latest quality verdict (ndcg@10) is fail" in str(outcome["result"])
    else:
        assert outcome["result"].state == "running"


# -- dead letters -------------------------------------------------------------------------------

def dead_letters_of(rh, key: bytes, payloads: list[bytes | None], target: str) -> None:
    """Put letters on the dead-letter topic, as a worker would, for originals read from ``target``."""
    rh.publish(rh.settings.topic_dead_letters, [
        (dead_letter_key(key), encode_dead_letter(
            reason=DeadLetterReason.UNKNOWN_MODEL, error="model 'later' is not registered",
            source=SourcePosition(target, 0, offset), key=key, payload=payload))
        for offset, payload in enumerate(payloads)])


def records_on(rh, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) on ``topic``."""

    async def read() -> list[tuple[bytes, bytes | None]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=rh.bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            records = []
            while batches := await consumer.getmany(timeout_ms=1500 if not records else 500):
                records += [(r.key, r.value) for batch in batches.values() for r in batch]
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_two_replays_at_once_publish_each_letter_once(rh):
    doc_id, target = f"race-{uuid.uuid4().hex[:8]}", f"replay-target-{uuid.uuid4().hex[:8]}"
    payloads = [f'{{"n": {n}}}'.encode() for n in range(5)]
    dead_letters_of(rh, doc_id.encode(), payloads, target)
    letters = asyncio.run(dlq.read_letters(rh.settings, rh.bootstrap, doc_id=doc_id))
    assert len(letters) == len(payloads)
    reports, start = [], threading.Barrier(2)

    def replay() -> None:
        with connections.connect(rh.settings, rh.database_url) as conn:
            start.wait()
            reports.append(asyncio.run(dlq.replay(rh.settings, conn, rh.bootstrap, letters, dry_run=False)))

    runs = [threading.Thread(target=replay) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted((len(r.replayed), len(r.already)) for r in reports) == [(0, 5), (5, 0)]  # the second waited
    assert sorted(records_on(rh, target)) == sorted((doc_id.encode(), p) for p in payloads)


def test_a_dead_lettered_tombstone_is_reported_not_replayed(rh):
    doc_id, target = f"tomb-{uuid.uuid4().hex[:8]}[/x]", f"replay-target-{uuid.uuid4().hex[:8]}"
    dead_letters_of(rh, doc_id.encode(), [None, b'{"n": 1}'], target)
    done = rh.segue("dlq", "replay", "--doc-id", doc_id)
    assert "replayed 1 letter(s); 0 replayed before" in done.stdout and "1 tombstone(s) not replayed" in done.stdout
    assert f"tombstone of key {doc_id!r}: it has no version" in done.stdout
    assert 'publish {"doc_id": …, "op": "delete", "version": …} instead' in done.stdout
    assert records_on(rh, target) == [(doc_id.encode(), b'{"n": 1}')]  # a tombstone replayed would be (key, None)


def test_letters_are_listed_as_they_are_not_as_console_markup(rh):
    doc_id = f"[bold]list-{uuid.uuid4().hex[:8]}[/x]"
    dead_letters_of(rh, doc_id.encode(), [b"{}"], "replay-target-unused")
    done = rh.segue("dlq", "list", "--doc-id", doc_id, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert doc_id in done.stdout and "1 letter(s)" in done.stdout


def test_records_on_the_dead_letter_topic_that_are_not_letters_are_skipped_and_said(rh):
    doc_id = f"among-strangers-{uuid.uuid4().hex[:8]}"
    rh.publish(rh.settings.topic_dead_letters, [
        (b"stranger", b"not a dead letter"), (b"stranger", None), (b"stranger", b'{"reason": "made up"}'),
        (b"stranger", b"[" * 300 + b"]" * 300)])
    dead_letters_of(rh, doc_id.encode(), [b"{}"], "replay-target-unused")
    for command in ("list", "replay"):
        done = rh.segue("dlq", command, "--doc-id", doc_id, check=False)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("is not a dead letter, skipped") >= 4
    assert doc_id in rh.segue("dlq", "list", "--doc-id", doc_id).stdout
