"""End to end: aiokafka producer → Tansu → worker subprocess → embedded PostgreSQL.

The worker is a real ``python -m segue.cli worker`` process with two tiny real models
registered (a static "old" one and a transformer "new" one).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import signal
import threading
import time
import uuid

import httpx
import numpy as np
import orjson
import psycopg
import pytest
from psycopg import sql

from segue.control import registry
from segue.embedding.engine import EmbeddingEngine
from segue.storage import connections, model_columns
from tests import modelfactory
from tests.conftest import NEW, OLD
from tests.harness import change, free_port, wait_for


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def live(harness):
    with connections.connect(harness.settings, harness.database_url) as conn:
        return registry.live_models(conn)


def document(harness, doc_id: str) -> dict | None:
    """The document row with each live model's vector and hash, or None."""
    models = live(harness)
    columns = [sql.SQL("body, version, content_sha256")]
    for m in models:
        columns.append(sql.SQL("{}, {}").format(model_columns.vector_column(m.version), model_columns.sha_column(m.version)))
    rows = harness.sql(
        sql.SQL("SELECT {} FROM documents WHERE doc_id = %s").format(sql.SQL(", ").join(columns)), (doc_id,)
    )
    if not rows:
        return None
    body, version, content, *rest = rows[0]
    vectors = {m.version: (rest[2 * i], rest[2 * i + 1]) for i, m in enumerate(models)}
    return {"body": body, "version": version, "content_sha256": content, "vectors": vectors}


def actions(harness, doc_id: str, origin: str = "change") -> list[tuple]:
    return harness.sql(
        "SELECT doc_version, model_version, action FROM migration_changelog"
        " WHERE doc_id = %s AND origin = %s ORDER BY id",
        (doc_id, origin),
    )


def wait_version(harness, doc_id: str, version: int) -> dict:
    return wait_for(
        lambda: (d := document(harness, doc_id)) and d["version"] == version and d,
        what=f"{doc_id} at version {version}",
    )


def test_change_is_dual_written_with_hashes(harness, worker, model_cache):
    doc_id = uid("dual")
    text = "Mitochondria are the powerhouse of the cell."
    harness.publish_changes([(doc_id, change(doc_id, text, 7, metadata={"lang": "en"}, event_id="evt-1"))])
    doc = wait_version(harness, doc_id, 7)

    models = live(harness)
    assert [m.name for m in models][:2] == [OLD, NEW]
    engine = EmbeddingEngine(device="cpu")
    try:
        for m in models:
            vector, vector_sha = doc["vectors"][m.version]
            assert vector is not None and len(vector.to_numpy()) == m.dim
            assert vector_sha == sha(text) == doc["content_sha256"]
            expected = engine.embed_sync(m, [text])[0]
            assert float(np.dot(vector.to_numpy(), expected)) > 0.999
    finally:
        engine.close()
    assert doc["body"] == text
    assert harness.scalar("SELECT metadata FROM documents WHERE doc_id = %s", (doc_id,)) == {"lang": "en"}
    assert sorted(actions(harness, doc_id)) == sorted((7, m.version, "embedded") for m in models)
    assert harness.scalar("SELECT count(*) FROM migration_changelog WHERE event_id = 'evt-1'") == len(models)


def test_unchanged_content_is_not_reembedded(harness, worker):
    doc_id = uid("same")
    harness.publish_changes([(doc_id, change(doc_id, "Stable text.", 1))])
    before = wait_version(harness, doc_id, 1)
    harness.publish_changes([(doc_id, change(doc_id, "Stable text.", 2, metadata={"touched": True}))])
    after = wait_version(harness, doc_id, 2)

    for version, (vector, vector_sha) in after["vectors"].items():
        assert vector_sha == before["vectors"][version][1]
        assert np.array_equal(vector.to_numpy(), before["vectors"][version][0].to_numpy())
    second = [a for a in actions(harness, doc_id) if a[0] == 2]
    assert {a[2] for a in second} == {"unchanged"} and len(second) == len(after["vectors"])


def test_out_of_order_and_duplicate_versions_end_at_highest(harness, worker):
    doc_id = uid("order")
    # One burst (likely one batch): highest version first, then older, duplicate and in-between.
    harness.publish_changes([
        (doc_id, change(doc_id, "version three", 3)),
        (doc_id, change(doc_id, "version one", 1)),
        (doc_id, change(doc_id, "version three again", 3)),
        (doc_id, change(doc_id, "version two", 2)),
    ])
    doc = wait_version(harness, doc_id, 3)
    wait_for(lambda: len({a[0] for a in actions(harness, doc_id)}) == 3, what="all four events logged")
    # Across batches: an older version arriving after the newer one is committed.
    harness.publish_changes([(doc_id, change(doc_id, "late version two", 2))])
    wait_for(lambda: len(actions(harness, doc_id)) == 5 * len(doc["vectors"]), what="the late event logged")

    doc = document(harness, doc_id)
    assert doc["version"] == 3 and doc["body"] == "version three"
    logged = actions(harness, doc_id)
    assert {a[2] for a in logged if a[0] != 3} == {"superseded"}
    embedded_v3 = [a for a in logged if a[0] == 3 and a[2] == "embedded"]
    assert len(embedded_v3) == len(doc["vectors"])  # the duplicate v3 did not embed again


def test_delete_and_tombstone_remove_and_block_older_upserts(harness, worker):
    deleted, tombstoned = uid("del"), uid("tomb")
    harness.publish_changes([(deleted, change(deleted, "to be deleted", 1)),
                             (tombstoned, change(tombstoned, "to be tombstoned", 4))])
    wait_version(harness, deleted, 1)
    wait_version(harness, tombstoned, 4)
    before = harness.scalar("SELECT documents FROM corpus_counters")

    harness.publish_changes([(deleted, orjson.dumps({"doc_id": deleted, "op": "delete", "version": 2})),
                             (tombstoned, None)])
    wait_for(lambda: document(harness, deleted) is None and document(harness, tombstoned) is None,
             what="both documents deleted")
    assert harness.scalar("SELECT documents FROM corpus_counters") == before - 2
    # Late replays of older versions must not resurrect them.
    harness.publish_changes([(deleted, change(deleted, "stale replay", 1)),
                             (tombstoned, change(tombstoned, "stale replay", 3))])
    wait_for(lambda: actions(harness, tombstoned)[-1][2] == "superseded", what="the replay to be superseded")
    wait_for(lambda: actions(harness, deleted)[-1][2] == "superseded", what="the replay to be superseded")
    assert document(harness, deleted) is None and document(harness, tombstoned) is None
    assert {a[2] for a in actions(harness, deleted) if a[0] == 2} == {"deleted"}
    assert harness.scalar("SELECT version FROM document_tombstones WHERE doc_id = %s", (tombstoned,)) == 4


def test_read_miss_reembeds_the_stored_body(harness, worker):
    doc_id = uid("miss")
    harness.publish_changes([(doc_id, change(doc_id, "Read me again.", 1))])
    wait_version(harness, doc_id, 1)
    new = next(m for m in live(harness) if m.name == NEW)
    # A missing vector, as for a document written before NEW was registered.
    harness.sql(
        sql.SQL("UPDATE documents SET {} = NULL, {} = NULL WHERE doc_id = %s RETURNING 1").format(
            model_columns.vector_column(new.version), model_columns.sha_column(new.version)),
        (doc_id,),
    )
    assert document(harness, doc_id)["vectors"][new.version] == (None, None)

    harness.publish_read_misses([(doc_id, orjson.dumps({"doc_id": doc_id, "model": NEW, "event_id": "rm-1"}))])
    doc = wait_for(lambda: (d := document(harness, doc_id))["vectors"][new.version][1] and d,
                   what="the read miss to be re-embedded")
    assert doc["vectors"][new.version][1] == sha("Read me again.")
    assert actions(harness, doc_id, "read_miss") == [(1, new.version, "embedded")]
    # A second miss for a now-current vector does no work.
    harness.publish_read_misses([(doc_id, orjson.dumps({"doc_id": doc_id, "model": NEW}))])
    wait_for(lambda: len(actions(harness, doc_id, "read_miss")) == 2, what="the second miss")
    assert actions(harness, doc_id, "read_miss")[-1][2] == "unchanged"


def test_bad_events_are_dead_lettered_and_valid_ones_written(harness, worker):
    good, unknown_doc = uid("good"), uid("nodoc")
    harness.publish_changes([
        ("bad-json", b'{"doc_id": "bad-json", "text": '),
        ("no-version", orjson.dumps({"doc_id": "no-version", "text": "hello"})),
        ("too-big", change("too-big", "x" * (harness.settings.max_text_bytes + 1), 1)),
        ("keyed-otherwise", change("the-real-doc-id", "ordering would be lost", 1)),
        (good, change(good, "a perfectly good document", 1)),
    ])
    harness.publish_read_misses([
        (good, orjson.dumps({"doc_id": good, "model": "no-such-model"})),
        (unknown_doc, orjson.dumps({"doc_id": unknown_doc, "model": NEW})),
        ("junk", b"\xff\xfe not json"),
    ])
    wait_version(harness, good, 1)

    def letters():
        found = {d["key"]: d for d in harness.dead_letters()}
        keys = {"bad-json", "no-version", "too-big", "keyed-otherwise", good, unknown_doc, "junk"}
        return keys <= found.keys() and found

    found = wait_for(letters, timeout=60, what="seven dead letters")
    assert found["keyed-otherwise"]["reason"] == "key_mismatch" and "the-real-doc-id" in found["keyed-otherwise"]["error"]
    assert document(harness, "the-real-doc-id") is None
    assert found["bad-json"]["reason"] == "bad_json"
    assert found["bad-json"]["payload"] == '{"doc_id": "bad-json", "text": '
    assert found["no-version"]["reason"] == "schema_violation" and "version" in found["no-version"]["error"]
    assert found["too-big"]["reason"] == "text_too_large"
    assert found[good]["reason"] == "unknown_model" and "no-such-model" in found[good]["error"]
    assert found[unknown_doc]["reason"] == "unknown_document"
    assert found["junk"]["reason"] == "bad_json" and found["junk"]["payload_encoding"] == "base64"
    for letter in found.values():
        assert letter["source"]["topic"] in {"document-changes", "read-misses"}
        assert letter["source"]["offset"] >= 0 and letter["source"]["partition"] in (0, 1)
    logged = dict(harness.sql(
        "SELECT doc_id, error FROM migration_changelog WHERE action = 'dead_lettered' AND doc_id = ANY(%s)",
        (["bad-json", "no-version", "too-big", unknown_doc],),
    ))
    assert logged["too-big"].startswith("text_too_large")
    assert logged[unknown_doc].startswith("unknown_document")


def test_poison_document_is_isolated(harness, worker):
    """A document PostgreSQL rejects fails alone; its batch-mates are written.

    Decoding already refuses what PostgreSQL cannot store (NUL characters, out-of-range
    versions), so the rejection here comes from a CHECK constraint added for the test.
    """
    ids = [uid("batch") for _ in range(6)]
    poison = uid("poison")
    harness.conn.execute(
        "ALTER TABLE documents ADD CONSTRAINT test_refuses_poison CHECK (body NOT LIKE '%refuse me%') NOT VALID")
    try:
        records = [(i, change(i, f"healthy document {n}", 1)) for n, i in enumerate(ids)]
        records.insert(3, (poison, change(poison, "please refuse me", 1)))
        harness.publish_changes(records)
        for doc_id in ids:
            wait_version(harness, doc_id, 1)
        letter = wait_for(lambda: [d for d in harness.dead_letters() if d["key"] == poison], what="the poison letter")
    finally:
        harness.conn.execute("ALTER TABLE documents DROP CONSTRAINT test_refuses_poison")
    assert letter[0]["reason"] == "processing_failed"
    assert document(harness, poison) is None
    logged = [a[2] for a in actions(harness, poison)]
    assert sorted(logged) == ["dead_lettered"] + ["failed"] * len(live(harness))
    error = harness.scalar("SELECT error FROM migration_changelog WHERE doc_id = %s AND action = 'failed'", (poison,))
    assert "CheckViolation" in error and "test_refuses_poison" in error


def test_progress_matches_direct_counts(harness, worker):
    doc_id = uid("count")
    harness.publish_changes([(doc_id, change(doc_id, "counted", 1))])
    wait_version(harness, doc_id, 1)
    total = harness.scalar("SELECT count(*) FROM documents")
    rows = harness.sql("SELECT model_version, total_documents, current_vectors, stale_vectors, missing_vectors,"
                       " coverage_pct FROM migration_progress ORDER BY model_version")
    assert [r[0] for r in rows] == [m.version for m in live(harness)]
    for version, docs, current, stale, missing, coverage in rows:
        v, h = model_columns.vector_column(version), model_columns.sha_column(version)
        direct = harness.sql(sql.SQL(
            "SELECT count(*) FILTER (WHERE {h} = content_sha256), count(*) FILTER (WHERE {h} <> content_sha256),"
            " count(*) FILTER (WHERE {h} IS NULL) FROM documents").format(h=h, v=v))[0]
        assert (docs, current, stale, missing) == (total, *direct)
        assert float(coverage) == pytest.approx(100.0 * direct[0] / total, abs=0.01)


def test_lost_database_connections_are_retried_not_dead_lettered(harness, worker):
    ids = [uid("reconnect") for _ in range(150)]
    harness.publish_changes([(i, change(i, f"written through connection loss {n}", 1)) for n, i in enumerate(ids)])
    killed = 0
    for _ in range(15):  # cut every other session's connection, repeatedly, while the batch is processed
        killed += harness.scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend') AS t")
        time.sleep(0.2)
    assert killed > 0
    wait_for(lambda: harness.scalar("SELECT count(*) FROM documents WHERE doc_id = ANY(%s)", (ids,)) == len(ids),
             timeout=120, what="every document after the connection losses")
    assert worker.poll() is None, "the worker died"
    assert harness.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = ANY(%s)"
                          " AND action IN ('failed', 'dead_lettered')", (ids,)) == 0


def test_worker_killed_mid_stream_loses_nothing(harness, worker):
    ids = [uid("kill") for _ in range(1000)]
    harness.publish_changes([(i, change(i, f"document {n} of the kill test, with words", 1)) for n, i in enumerate(ids)])
    wait_for(lambda: harness.scalar("SELECT count(*) FROM documents WHERE doc_id = ANY(%s)", (ids,)) >= 20,
             what="the worker to be mid-stream")
    harness.stop_worker(worker, sig=signal.SIGKILL)
    assert worker.returncode == -signal.SIGKILL
    written_at_kill = harness.scalar("SELECT count(*) FROM documents WHERE doc_id = ANY(%s)", (ids,))

    harness.start_worker()
    wait_for(lambda: harness.scalar("SELECT count(*) FROM documents WHERE doc_id = ANY(%s)", (ids,)) == len(ids),
             timeout=180, what="all documents after the restart")
    models = live(harness)
    complete = sql.SQL(" AND ").join(sql.SQL("{} = content_sha256").format(model_columns.sha_column(m.version)) for m in models)
    assert harness.scalar(sql.SQL("SELECT count(*) FROM documents WHERE doc_id = ANY(%s) AND {}").format(complete),
                          (ids,)) == len(ids)
    assert written_at_kill < len(ids), "the kill came too late to test anything"
    for version, docs, current in harness.sql(
        "SELECT model_version, total_documents, current_vectors FROM migration_progress"
    ):
        assert docs == harness.scalar("SELECT count(*) FROM documents")
        assert current == harness.scalar(
            sql.SQL("SELECT count(*) FROM documents WHERE {} = content_sha256").format(model_columns.sha_column(version)))


def test_new_model_is_picked_up_without_restart(harness, worker, model_cache):
    with connections.connect(harness.settings, harness.database_url) as conn:
        added = registry.register_model(conn, "late-b", str(modelfactory.tiny_transformer_b(model_cache)))
    doc_id = uid("late")
    harness.publish_changes([(doc_id, change(doc_id, "written after late-b was registered", 1))])
    doc = wait_version(harness, doc_id, 1)
    vector, vector_sha = doc["vectors"][added.version]
    assert vector_sha == sha("written after late-b was registered")
    assert len(vector.to_numpy()) == modelfactory.TINY_B_DIM
    assert {a[2] for a in actions(harness, doc_id)} == {"embedded"} and len(actions(harness, doc_id)) == 3


def test_cli_reports_models_and_progress(harness, worker):
    def segue(*args: str) -> str:
        return harness.segue(*args).stdout

    listed = segue("models", "list")
    assert OLD in listed and NEW in listed and "live" in listed
    status = segue("status")
    assert "migration_progress" in status and "migration_progress_by_origin" in status
    total = harness.scalar("SELECT documents FROM corpus_counters")
    assert str(total) in status
    assert "no migration in progress" in segue("migrate", "status")
    refused = harness.segue("migrate", "cutover", check=False)
    assert refused.returncode != 0 and "no migration is in progress" in refused.stderr


def test_a_tombstone_is_recorded_at_the_highest_version_seen(harness, worker):
    """[upsert v5, tombstone] over a stored v3 (and for a new document): a late v4 must not resurrect either."""
    stored, fresh = uid("resurrect"), uid("resurrect-new")
    harness.publish_changes([(stored, change(stored, "version three", 3))])
    wait_version(harness, stored, 3)
    harness.publish_changes([(stored, change(stored, "version five", 5)), (stored, None),
                             (fresh, change(fresh, "version five", 5)), (fresh, None)])
    tombstone = "SELECT version FROM document_tombstones WHERE doc_id = %s"
    wait_for(lambda: harness.scalar(tombstone, (stored,)) == 5 and harness.scalar(tombstone, (fresh,)) == 5,
             what="both tombstones at version 5")
    harness.publish_changes([(stored, change(stored, "late version four", 4)),
                             (fresh, change(fresh, "late version four", 4))])
    for doc_id in (stored, fresh):
        wait_for(lambda doc_id=doc_id: [a for a in actions(harness, doc_id) if a[0] == 4],
                 what=f"the late v4 of {doc_id} logged")
        assert document(harness, doc_id) is None
        assert {a[2] for a in actions(harness, doc_id) if a[0] == 4} == {"superseded"}


def test_a_change_delivered_again_fills_in_only_the_vectors_its_document_lacks(harness, worker):
    doc_id = uid("fill-in")
    record = (doc_id, change(doc_id, "a document whose new-model write was lost", 7))
    harness.publish_changes([record])
    doc = wait_version(harness, doc_id, 7)
    old, new = {m.name: m for m in live(harness)}[OLD], {m.name: m for m in live(harness)}[NEW]
    old_vector = doc["vectors"][old.version][0]
    harness.sql(sql.SQL("UPDATE documents SET {v} = NULL, {h} = NULL WHERE doc_id = %s RETURNING 1").format(
        v=model_columns.vector_column(new.version), h=model_columns.sha_column(new.version)), (doc_id,))

    models = live(harness)
    harness.publish_changes([record])  # the same record again (a redelivery, or a replayed dead letter)
    wait_for(lambda: len(actions(harness, doc_id)) == 2 * len(models), what="the second delivery logged")

    doc = document(harness, doc_id)
    assert doc["vectors"][new.version][1] == doc["content_sha256"]  # filled in: current again
    assert doc["vectors"][old.version][1] == doc["content_sha256"]
    assert np.array_equal(doc["vectors"][old.version][0], old_vector)  # not written again
    assert sorted(actions(harness, doc_id)[len(models):]) == sorted(
        (7, m.version, "embedded" if m.version == new.version else "unchanged") for m in models)


def test_a_text_one_model_gives_no_vector_is_written_with_the_others_and_dead_lettered(harness, worker):
    """The static model has no token for an empty text (an all-zero vector): only its vector is missing."""
    doc_id = uid("empty-text")
    harness.publish_changes([(doc_id, change(doc_id, "", 1))])
    doc = wait_version(harness, doc_id, 1)
    old, new = {m.name: m for m in live(harness)}[OLD], {m.name: m for m in live(harness)}[NEW]
    wait_for(lambda: len(actions(harness, doc_id)) == len(live(harness)) + 1,
             what="the outcome and the dead letter logged")

    assert doc["vectors"][new.version][1] == doc["content_sha256"]
    assert doc["vectors"][old.version] == (None, None)
    failed = harness.scalar("SELECT error FROM migration_changelog WHERE doc_id = %s AND action = 'failed'", (doc_id,))
    assert failed.startswith("input_rejected: zero: ")
    letter = wait_for(lambda: [d for d in harness.dead_letters() if d["key"] == doc_id], what="the dead letter")[0]
    assert letter["reason"] == "input_rejected" and letter["error"].startswith(f"model {OLD!r}: zero: ")
    # The session's other tests see a complete static column again (the reader's routing depends on it).
    harness.publish_changes([(doc_id, change(doc_id, None, 2, op="delete"))])
    wait_for(lambda: document(harness, doc_id) is None, what="the empty document deleted")


def test_an_oversized_key_is_dead_lettered_and_the_partition_moves_on(harness, worker):
    """A 2.7 KB key of incompressible text: once retried forever (btree row too large), now a dead letter."""
    import random
    import string

    rng = random.Random(7)
    huge_key = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(2700))
    long_doc_id = "L" * 600
    after = uid("after-huge-key")
    harness.publish_changes([(huge_key, None), (long_doc_id, change(long_doc_id, "too long an id", 1)),
                             (after, change(after, "written after the bad keys", 1))])
    wait_version(harness, after, 1)
    by_key = {hashlib.sha256(k.encode()).hexdigest(): k for k in (huge_key, long_doc_id)}

    def letters():
        found = {d["key_sha256"]: d for d in harness.dead_letters() if d.get("key_sha256") in by_key}
        return len(found) == 2 and found

    found = wait_for(letters, what="both dead letters")
    reasons = {by_key[sha]: letter["reason"] for sha, letter in found.items()}
    assert reasons == {huge_key: "invalid_key", long_doc_id: "schema_violation"}
    rows = harness.sql("SELECT doc_id FROM migration_changelog WHERE action = 'dead_lettered'"
                       " AND (doc_id = %s OR doc_id = %s)", (huge_key[:512], long_doc_id[:512]))
    assert sorted(len(d) for (d,) in rows) == [512, 512]  # recorded, cut to what a doc_id may be


def test_a_dead_letter_too_large_for_kafka_is_trimmed_not_retried(harness, worker):
    key = uid("huge-payload")
    payload = bytes(range(128, 256)) * 7000  # 896,000 bytes that are not UTF-8: base64 would make 1.2 MB
    after = uid("after-huge-payload")
    harness.publish_changes([(key, payload), (after, change(after, "written after the huge dead letter", 1))])
    wait_version(harness, after, 1)
    (letter,) = wait_for(lambda: [d for d in harness.dead_letters() if d["key"] == key], what="the dead letter")
    assert letter["reason"] == "bad_json" and letter["payload_truncated"] is True
    assert letter["payload_bytes"] == len(payload)
    assert letter["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert payload.startswith(base64.b64decode(letter["payload"]))


def test_a_model_that_cannot_load_pauses_its_writes_and_dead_letters_nothing(harness, worker, model_cache, tmp_path):
    source = tmp_path / "flaky-model"
    shutil.copytree(modelfactory.tiny_transformer_b(model_cache), source)
    with connections.connect(harness.settings, harness.database_url) as conn:
        flaky = registry.register_model(conn, "flaky", str(source))
    hidden = tmp_path / "flaky-model-away"
    source.rename(hidden)  # as on a host where the model's folder is missing
    doc_id = uid("while-flaky")
    harness.publish_changes([(doc_id, change(doc_id, "written while a model cannot load", 1))])
    running = harness.workers[-1]  # the session's worker, or its replacement after the kill test
    wait_for(lambda: "cannot be loaded from" in harness.worker_log(running), what="the load failure in the log")
    time.sleep(2)
    assert document(harness, doc_id) is None
    assert not [d for d in harness.dead_letters() if d["key"] == doc_id]
    hidden.rename(source)  # the folder is back: the retried batch goes through
    doc = wait_version(harness, doc_id, 1)
    assert doc["vectors"][flaky.version][1] == sha("written while a model cannot load")
    assert harness.scalar("SELECT count(*) FROM migration_changelog WHERE doc_id = %s"
                          " AND action IN ('failed', 'dead_lettered')", (doc_id,)) == 0
    assert running.poll() is None
    retire(harness, flaky.version)


def test_a_worker_whose_model_cannot_load_at_start_runs_not_ready_and_is_ready_once_it_loads(
        harness, worker, model_cache, tmp_path):
    """Models load while the worker joins the group; a model that cannot load is retried, not a crash."""
    source = tmp_path / "late-model"
    shutil.copytree(modelfactory.tiny_transformer_b(model_cache), source)
    with connections.connect(harness.settings, harness.database_url) as conn:
        late = registry.register_model(conn, "late", str(source))
    hidden = tmp_path / "late-model-away"
    source.rename(hidden)
    starting = harness.start_worker(harness.env | {"SEGUE_METRICS_PORT": str(free_port())})
    try:
        log_says = lambda text: text in harness.worker_log(starting)  # noqa: E731
        wait_for(lambda: log_says("loading the live models failed"), timeout=120, what="the load failure logged")
        url = wait_for(lambda: re.search(r"metrics at (http://\S+)/metrics", harness.worker_log(starting)),
                       what="the metrics URL")[1]
        answer = httpx.get(f"{url}/readyz", timeout=5)
        assert answer.status_code == 503 and answer.json()["models_warm"] is False
        assert starting.poll() is None
        hidden.rename(source)  # the folder is back: the next try loads it
        wait_for(lambda: log_says("loaded and warmed"), timeout=120, what="the models warm")
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=120, what="/readyz 200")
    finally:
        harness.stop_worker(starting)
        retire(harness, late.version)


def test_no_ddl_waits_in_line_for_an_index_build(harness, worker, model_cache):
    """With documents locked as CREATE INDEX CONCURRENTLY locks it, reads run, writes flow, a registration waits."""
    blocker = psycopg.connect(harness.database_url, autocommit=False)
    try:
        blocker.execute("LOCK TABLE documents IN SHARE UPDATE EXCLUSIVE MODE")  # what a concurrent build holds
        started = time.monotonic()
        for command in (["status"], ["models", "list"], ["db", "upgrade"]):
            harness.segue(*command, timeout=60)
        assert time.monotonic() - started < 45, "a read-only command waited for the lock"

        registered: dict = {}

        def register() -> None:
            with connections.connect(harness.settings, harness.database_url) as conn:
                registered["spec"] = registry.register_model(conn, "while-locked",
                                                             str(modelfactory.tiny_static(model_cache)))

        registering = threading.Thread(target=register)
        registering.start()
        doc_id = uid("while-locked")
        harness.publish_changes([(doc_id, change(doc_id, "written while a registration waits", 1))])
        wait_version(harness, doc_id, 1)  # writes are not stuck behind the waiting ALTER TABLE
        assert registering.is_alive() and "spec" not in registered
    finally:
        blocker.rollback()
        blocker.close()
    registering.join(timeout=120)
    assert "spec" in registered, "the registration did not go through once the lock was released"
    retire(harness, registered["spec"].version)


def test_services_status_never_prints_a_password(harness):
    env = {**harness.env, "SEGUE_DATABASE_URL": harness.database_url.replace("postgres:@", "postgres:Sw0rdfish!@"),
           "SEGUE_KAFKA_URL": f"kafka://{harness.bootstrap}"}
    done = harness.segue("services", "status", env=env)
    assert "Sw0rdfish!" not in done.stdout + done.stderr
    assert "postgres:***@" in done.stdout


def retire(harness, version: int) -> None:
    """Retire a model a test registered, as migrate finish would (the worker then stops writing it)."""
    with connections.connect(harness.settings, harness.database_url) as conn, conn.transaction():
        conn.execute("UPDATE embedding_models SET state = 'retired', retired_at = now() WHERE version = %s",
                      (version,))
        conn.execute("DELETE FROM vector_counters WHERE model_version = %s", (version,))
        model_columns.install_vector_counters(conn)
