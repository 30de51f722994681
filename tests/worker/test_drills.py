"""Failure drills on real services and real workers: crashes, an outage, a lost worker, fuzz, disorder, replay.

Each drill publishes changes through a :class:`~tests.ledger.Ledger`, which knows the
state the contract promises, does its damage, and then waits until the store holds
exactly that state: every document at the highest version published (or deleted), with
both models' vectors current; nothing lost, nothing stale, nothing resurrected. The
drills share embedded services of their own, with an old (static) and a new
(transformer) model registered, so every change is dual-written.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import orjson
import pytest
from psycopg import sql

from segue.control import registry
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.harness import Harness, change, wait_for
from tests.ledger import Ledger

pytestmark = pytest.mark.drill


@pytest.fixture(scope="module")
def dh(tmp_path_factory, model_cache):
    h = Harness(tmp_path_factory.mktemp("drills"))
    with connections.connect(h.settings, h.database_url) as conn:
        registry.register_model(conn, "old-static", str(modelfactory.tiny_static(model_cache)))
        registry.register_model(conn, "new-tiny", str(modelfactory.tiny_transformer_a(model_cache)))
    yield h
    h.close()


@pytest.fixture
def running(dh):
    """A ready worker, shared by the drills while it lives (a start costs seconds); every other worker a drill
    started is stopped afterwards."""
    alive = [w for w in dh.workers if w.poll() is None]
    worker = alive[-1] if alive else dh.start_worker()
    dh.wait_ready(worker)
    yield worker
    for started in dh.workers:
        if started is not worker:
            dh.stop_worker(started)


LEDGERS: list[Ledger] = []  # every drill's, so the replay drill can check them all again


def converge(dh, ledger: Ledger, *, timeout: float = 240) -> None:
    """Wait until the store holds what the ledger promises; fail with the first differences."""
    if ledger not in LEDGERS:
        LEDGERS.append(ledger)
    deadline = time.monotonic() + timeout
    while (wrong := ledger.mismatches(dh)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not wrong, f"{len(wrong)} documents differ, e.g. {wrong[:5]}"


def assert_progress_exact(dh) -> None:
    """migration_progress (trigger-kept counters) equals direct counts of the table."""
    total = dh.scalar("SELECT count(*) FROM documents")
    for version, documents, current, stale in dh.sql(
            "SELECT model_version, total_documents, current_vectors, stale_vectors FROM migration_progress"):
        h = model_columns.sha_column(version)
        direct = dh.sql(sql.SQL("SELECT count(*) FILTER (WHERE {h} = content_sha256),"
                                " count(*) FILTER (WHERE {h} <> content_sha256) FROM documents").format(h=h))[0]
        assert (documents, current, stale) == (total, *direct)


def assert_nothing_failed(dh, prefix: str) -> None:
    assert dh.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id LIKE %s"
                     " AND action IN ('failed', 'dead_lettered')", (prefix + "%",)) == 0


def logged(dh, prefix: str) -> int:
    return dh.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id LIKE %s", (prefix + "%",))


KILLS = 3  # each costs a worker restart (about 20 s here); three already interleave kills with every kind of change


def test_kill_9_three_times_mid_stream(dh, running):
    rng = random.Random(2026)
    ledger = Ledger()
    docs = [f"kill-{n:03d}" for n in range(150)]
    worker = running
    for round_ in range(KILLS):
        before = logged(dh, "kill-")
        # Versions overlap between rounds, so late and stale updates keep coming.
        dh.publish_changes(ledger.random_ops(rng, docs, 250, max_version=10 * round_ + 20, tag=f" r{round_}"))
        wait_for(lambda: logged(dh, "kill-") > before, timeout=120, what=f"round {round_} under way")
        time.sleep(rng.uniform(0.0, 1.5))
        dh.stop_worker(worker, sig=signal.SIGKILL)
        assert worker.returncode == -signal.SIGKILL
        worker = dh.start_worker()
    converge(dh, ledger)
    assert_nothing_failed(dh, "kill-")
    assert_progress_exact(dh)


def test_a_30_second_database_outage(dh, running):
    rng = random.Random(30)
    ledger = Ledger()
    docs = [f"outage-{n:03d}" for n in range(200)]
    published = threading.Event()

    def stream() -> None:
        for round_ in range(20):  # about 20 s of traffic, across the outage
            dh.publish_changes(ledger.random_ops(rng, docs, 50, max_version=5 * round_ + 10, tag=f" s{round_}"))
            time.sleep(1.0)
        published.set()

    producer = threading.Thread(target=stream)
    producer.start()
    wait_for(lambda: logged(dh, "outage-") > 0, what="traffic flowing")
    dh.stop_database()
    time.sleep(30)
    assert running.poll() is None, "the worker exited during the outage"
    dh.start_database()
    producer.join()
    assert published.is_set()
    converge(dh, ledger)
    assert running.poll() is None
    assert_nothing_failed(dh, "outage-")
    assert_progress_exact(dh)


def test_two_workers_one_killed(dh, running):
    second = dh.start_worker()
    rng = random.Random(2)
    ledger = Ledger()
    docs = [f"pair-{n:03d}" for n in range(300)]
    dh.publish_changes(ledger.random_ops(rng, docs, 600, max_version=30))
    wait_for(lambda: logged(dh, "pair-") > 100, timeout=120, what="both workers under way")
    dh.stop_worker(second, sig=signal.SIGKILL)
    dh.publish_changes(ledger.random_ops(rng, docs, 600, max_version=60, tag=" after"))
    converge(dh, ledger)
    assert running.poll() is None
    assert_nothing_failed(dh, "pair-")


def test_shuffled_versions_duplicates_deletes_and_tombstones(dh, running):
    rng = random.Random(5)
    ledger = Ledger()
    docs = [f"order-{n:02d}" for n in range(40)]
    dh.publish_changes(ledger.random_ops(rng, docs, 400, max_version=12))  # most in shared batches
    for burst in range(10):  # and across batches
        dh.publish_changes(ledger.random_ops(rng, docs, 15, max_version=15, tag=f" b{burst}"))
        time.sleep(0.3)
    converge(dh, ledger)
    deleted = [d for d, e in ledger.state.items() if e.body is None]
    assert deleted and len(deleted) < len(docs), "the drill should end with some documents deleted and some not"
    assert_nothing_failed(dh, "order-")


def test_replaying_the_whole_topic_changes_nothing(dh, running):
    """At-least-once: a worker of a new consumer group processes every change again, tombstones too.

    Every drill before this one is checked again afterwards: the replayed history must
    leave each document exactly as it was.
    """
    ledger = Ledger()
    docs = [f"replay-{n}" for n in range(8)]
    records = []
    for doc_id in docs:  # a tombstone between two versions: replayed, it must not delete the later one
        records += [ledger.upsert(doc_id, 3, f"{doc_id} v3"), ledger.tombstone(doc_id),
                    ledger.upsert(doc_id, 7, f"{doc_id} v7")]
    dh.publish_changes(records)
    converge(dh, ledger)
    dh.stop_worker(running)
    replayed = [doc_id for done in LEDGERS for doc_id in done.state]
    events = sum(len(done.records) for done in LEDGERS)
    mark = dh.scalar("SELECT max(id) FROM migration_changelog")
    dh.wait_ready(dh.start_worker({**dh.env, "SEGUE_GROUP_ID": "segue-replay"}), timeout=300)
    again = "SELECT count(*) FROM migration_changelog WHERE id > %s AND doc_id = ANY(%s)"
    wait_for(lambda: dh.scalar(again, (mark, replayed)) >= 2 * events, timeout=300,  # a row per event and model
             what="the whole topic replayed")
    for done in LEDGERS:
        converge(dh, done, timeout=60)
    assert_progress_exact(dh)


BAD_CHANGES = [
    # (reason, key, value) — key None means no key; value None is a tombstone
    ("bad_json", "k", b'{"doc_id": "k", "text": '),
    ("bad_json", "k", b"\xff\xfe\xfd not UTF-8"),
    ("bad_json", "k", b'{"doc_id": "k", "text": "lone \\ud800 surrogate", "version": 1}'),
    ("schema_violation", "k", b"[1, 2, 3]"),
    ("schema_violation", "k", b"42"),
    ("schema_violation", "k", b'"a string"'),
    ("schema_violation", "k", b"null"),
    ("schema_violation", "k", b'{"doc_id": 7, "text": "x", "version": 1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": 7, "version": 1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": "1"}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 1, "metadata": [1]}'),
    ("schema_violation", "k", b'{"text": "no doc id", "version": 1}'),
    ("schema_violation", "", b'{"doc_id": "", "text": "empty id", "version": 1}'),
    ("schema_violation", "L" * 600, orjson.dumps({"doc_id": "L" * 600, "text": "overlong id", "version": 1})),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": -1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 5.0}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 1e3}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 18446744073709551615}'),
    ("schema_violation", "k", b'{"doc_id": "k", "op": "merge", "text": "x", "version": 1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "version": 1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "nul \\u0000 byte", "version": 1}'),
    ("schema_violation", "k\x00k", b'{"doc_id": "k\\u0000k", "text": "nul in the id", "version": 1}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 1, "metadata": {"a": "\\u0000"}}'),
    ("schema_violation", "k", b'{"doc_id": "k", "text": "x", "version": 1, "colour": "red"}'),
    ("text_too_large", "k", None),  # filled in below: text over SEGUE_MAX_TEXT_BYTES
    ("key_mismatch", "other", b'{"doc_id": "k", "text": "keyed otherwise", "version": 1}'),
    ("key_mismatch", None, b'{"doc_id": "k", "text": "no key", "version": 1}'),
    ("invalid_key", b"", None),  # a tombstone with an empty key (aiokafka cannot send one with no key at all)
    ("invalid_key", "T" * 2700, None),  # a tombstone whose key no doc_id can be
    ("invalid_key", b"\xff\xfe", None),
]


def test_fuzz_ten_thousand_bad_events_among_a_thousand_good(dh, running):
    rng = random.Random(10_000)
    too_large = orjson.dumps({"doc_id": "k", "text": "x" * (dh.settings.max_text_bytes + 1), "version": 1})
    cases = [(r, k, too_large if r == "text_too_large" else v) for r, k, v in BAD_CHANGES]
    ledger = Ledger()
    docs = [f"fuzz-{n:03d}" for n in range(250)]
    good = ledger.random_ops(rng, docs, 1000, max_version=40)
    bad = iter([cases[n % len(cases)] for n in range(9_000)])
    valid = iter([("good", key, value) for key, value in good])
    slots = ["good"] * len(good) + ["bad"] * 9_000
    rng.shuffle(slots)  # bad events interleaved; the valid ones keep their order, which the ledger assumed
    stream = [next(valid) if slot == "good" else next(bad) for slot in slots]
    # Read misses for unknown documents and unknown models, on their own topic.
    misses = [("unknown_document", f"fuzz-nodoc-{n}", orjson.dumps({"doc_id": f"fuzz-nodoc-{n}", "model": "new-tiny"}))
              for n in range(500)]
    misses += [("unknown_model", docs[n % 250], orjson.dumps({"doc_id": docs[n % 250], "model": "no-such-model"}))
               for n in range(500)]
    changes_at = dh.publish_changes([(key, value) for _, key, value in stream])
    misses_at = dh.publish_read_misses([(key, value) for _, key, value in misses])
    expected = {("document-changes", *at): reason for (reason, _, _), at in zip(stream, changes_at) if reason != "good"}
    expected |= {("read-misses", *at): reason for (reason, _, _), at in zip(misses, misses_at)}
    assert len(expected) == 10_000

    converge(dh, ledger, timeout=300)

    def letters() -> dict | None:
        found = {(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]): d["reason"]
                 for d in dh.dead_letters() if d["source"]["topic"] in ("document-changes", "read-misses")}
        return expected.keys() <= found.keys() and found

    found = wait_for(letters, timeout=300, interval=3, what="every bad event dead-lettered")
    wrong = {at: (found[at], reason) for at, reason in expected.items() if found[at] != reason}
    assert not wrong, f"{len(wrong)} dead letters with an unexpected reason, e.g. {list(wrong.items())[:5]}"
    good_positions = {("document-changes", *at) for (reason, _, _), at in zip(stream, changes_at) if reason == "good"}
    assert not good_positions & found.keys(), "a valid event was dead-lettered"
    assert running.poll() is None
    probe = "fuzz-after"
    dh.publish_changes([(probe, change(probe, "the worker still keeps up", 1))])
    wait_for(lambda: dh.scalar("SELECT count(*) FROM documents WHERE doc_id = %s", (probe,)) == 1,
             timeout=60, what="a change after the fuzz")
