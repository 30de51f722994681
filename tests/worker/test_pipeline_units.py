"""Plain-function tests of decoding, batch ordering rules and poison isolation (no services)."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import jsonschema_rs
import psycopg
import pytest

from segue.errors import EngineStopped, ModelUnavailable
from segue.schemas.events import (
    DEAD_LETTER_MAX_BYTES,
    DeadLetterReason,
    InvalidEvent,
    SourcePosition,
    dead_letter_key,
    decode_change,
    decode_read_miss,
    encode_dead_letter,
    load_schema,
)
from segue.worker.batches import (
    ChangeEvent,
    Envelope,
    highest_versions,
    latest_per_document,
    split_rounds,
)
from segue.worker.isolation import is_transient, process_isolating_poison


def event(doc_id: str, version: int | None, offset: int) -> ChangeEvent:
    from segue.schemas.events import DocumentChange

    change = DocumentChange(doc_id=doc_id, op="delete" if version is None else "upsert", version=version,
                            text=None if version is None else f"v{version}")
    return ChangeEvent(Envelope(doc_id.encode(), b"", SourcePosition("t", 0, offset)), change)


def test_decode_change_accepts_upserts_deletes_and_tombstones():
    upsert = decode_change(b"a", b'{"doc_id": "a", "text": "hi", "version": 3, "metadata": {"k": 1}}',
                           max_text_bytes=100)
    assert (upsert.op, upsert.version, upsert.text, upsert.metadata) == ("upsert", 3, "hi", {"k": 1})
    delete = decode_change(b"a", b'{"doc_id": "a", "op": "delete", "version": 4}', max_text_bytes=100)
    assert delete.is_delete and delete.text is None
    tombstone = decode_change(b"a", None, max_text_bytes=100)
    assert tombstone.is_delete and tombstone.version is None and tombstone.doc_id == "a"


@pytest.mark.parametrize(
    ("value", "reason", "fragment"),
    [
        (b"{not json", DeadLetterReason.BAD_JSON, "not valid JSON"),
        (b'{"doc_id": "a", "version": 1}', DeadLetterReason.SCHEMA_VIOLATION, "text"),
        (b'{"doc_id": "", "text": "x", "version": 1}', DeadLetterReason.SCHEMA_VIOLATION, "doc_id"),
        (b'{"doc_id": "a", "text": "x", "version": -1}', DeadLetterReason.SCHEMA_VIOLATION, "version"),
        (b'{"doc_id": "a", "text": "x", "version": 1, "colour": "red"}', DeadLetterReason.SCHEMA_VIOLATION,
         "colour"),
        (b'{"doc_id": "a", "text": "' + b"x" * 101 + b'", "version": 1}', DeadLetterReason.TEXT_TOO_LARGE, "101"),
    ],
)
def test_decode_change_rejects_bad_input_with_a_reason(value, reason, fragment):
    with pytest.raises(InvalidEvent) as raised:
        decode_change(b"a", value, max_text_bytes=100)
    assert raised.value.reason is reason and fragment in str(raised.value)


def test_decode_read_miss_requires_a_model():
    assert decode_read_miss(b'{"doc_id": "a", "model": "m"}').model == "m"
    with pytest.raises(InvalidEvent, match="model"):
        decode_read_miss(b'{"doc_id": "a"}')


def test_latest_per_document_keeps_the_highest_version_and_the_first_of_equals():
    events = [event("a", 3, 0), event("a", 1, 1), event("a", 3, 2), event("b", 1, 3), event("a", 2, 4)]
    winners, superseded = latest_per_document(events)
    assert [(e.change.doc_id, e.envelope.source.offset) for e in winners] == [("a", 0), ("b", 3)]
    assert sorted(e.envelope.source.offset for e in superseded) == [1, 2, 4]


def test_events_after_a_tombstone_go_to_a_later_round():
    events = [event("a", 1, 0), event("b", 1, 1), event("a", None, 2), event("a", 5, 3), event("b", 2, 4)]
    rounds = split_rounds(events)
    assert [[e.envelope.source.offset for e in r] for r in rounds] == [[0, 1, 2], [3, 4]]
    winners, _ = latest_per_document(rounds[0])
    assert {e.change.doc_id: e.change.version for e in winners} == {"a": None, "b": 1}
    # The tombstone of "a" is recorded at the highest version its round carried.
    assert highest_versions(rounds[0]) == {"a": 1, "b": 1}


def run_isolated(items, process, attempts=3):
    poisoned = []

    async def on_poison(item, error):
        poisoned.append((item, str(error)))

    asyncio.run(process_isolating_poison(items, process, on_poison, attempts=attempts, backoff_s=0, label="t"))
    return poisoned


def test_a_poison_item_is_isolated_and_the_rest_processed():
    done = []

    async def process(batch):
        if 5 in batch:
            raise ValueError("cannot embed 5")
        done.extend(batch)

    assert run_isolated(list(range(10)), process) == [(5, "cannot embed 5")]
    assert sorted(done) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_connection_errors_are_retried_not_dead_lettered():
    calls = []

    async def process(batch):
        calls.append(list(batch))
        if len(calls) <= 5:  # more failures than attempts: an outage, not a poison batch
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    assert run_isolated([1, 2, 3], process, attempts=2) == []
    assert calls == [[1, 2, 3]] * 6


@pytest.mark.parametrize(
    ("key", "value", "reason", "fragment"),
    [
        (b"a", b'{"doc_id": "a", "text": "x", "version": 5.0}', DeadLetterReason.SCHEMA_VIOLATION, "integer literal"),
        (b"a", b'{"doc_id": "a", "text": "x", "version": 1e3}', DeadLetterReason.SCHEMA_VIOLATION, "integer literal"),
        (b"a", b'{"doc_id": "a", "text": "x", "version": 18446744073709551615}', DeadLetterReason.SCHEMA_VIOLATION,
         "version"),
        (b"a", b'{"doc_id": "a", "text": "x", "version": 9223372036854775808}', DeadLetterReason.SCHEMA_VIOLATION,
         "version"),
        (b"a", b'{"doc_id": "a", "text": "nul \\u0000 here", "version": 1}', DeadLetterReason.SCHEMA_VIOLATION,
         "text contains a NUL"),
        (b"a", b'{"doc_id": "a", "text": "x", "version": 1, "metadata": {"k": ["ok", "\\u0000"]}}',
         DeadLetterReason.SCHEMA_VIOLATION, "metadata/k/1 contains a NUL"),
        (b"a", b'{"doc_id": "a", "text": "x", "version": 1, "metadata": {"\\u0000": 1}}',
         DeadLetterReason.SCHEMA_VIOLATION, "contains a NUL"),
        (b"a", b'{"doc_id": "a", "text": "lone \\ud800 surrogate", "version": 1}', DeadLetterReason.BAD_JSON,
         "surrogate"),
        (b"b", b'{"doc_id": "a", "text": "x", "version": 1}', DeadLetterReason.KEY_MISMATCH, "not the doc_id 'a'"),
        (None, b'{"doc_id": "a", "text": "x", "version": 1}', DeadLetterReason.KEY_MISMATCH, "key (none)"),
        (None, None, DeadLetterReason.INVALID_KEY, "no key"),
        (b"", None, DeadLetterReason.INVALID_KEY, "no key"),
        (b"\xff\xfe", None, DeadLetterReason.INVALID_KEY, "not UTF-8"),
        (b"k" * 513, None, DeadLetterReason.INVALID_KEY, "513 characters"),
        (b"a\x00b", None, DeadLetterReason.INVALID_KEY, "NUL"),
    ],
)
def test_decode_change_rejects_what_postgres_or_ordering_cannot_take(key, value, reason, fragment):
    with pytest.raises(InvalidEvent) as raised:
        decode_change(key, value, max_text_bytes=100)
    assert raised.value.reason is reason and fragment in str(raised.value)


def test_the_largest_version_and_doc_id_are_accepted():
    change = decode_change(b"d" * 512, b'{"doc_id": "' + b"d" * 512 + b'", "text": "x", "version": 9223372036854775807}',
                           max_text_bytes=100)
    assert change.version == 2**63 - 1 and len(change.doc_id) == 512


def _dead_letter(key: bytes | None, payload: bytes | None, error: str = "boom") -> tuple[bytes, dict]:
    import orjson

    encoded = encode_dead_letter(reason=DeadLetterReason.BAD_JSON, error=error,
                                 source=SourcePosition("document-changes", 1, 42), key=key, payload=payload)
    letter = orjson.loads(encoded)
    jsonschema_rs.validate(load_schema("dead_letter"), letter, validate_formats=True)
    return encoded, letter


def test_a_dead_letter_keeps_a_small_payload_whole():
    _, letter = _dead_letter(b"doc-1", b'{"doc_id": "doc-1", "text": ')
    assert letter["payload"] == '{"doc_id": "doc-1", "text": ' and letter["payload_truncated"] is False
    assert letter["payload_bytes"] == 28 and letter["key"] == "doc-1" and letter["key_truncated"] is False
    _, binary = _dead_letter(b"doc-1", b"\xff\xfe\x00")
    assert binary["payload_encoding"] == "base64" and base64.b64decode(binary["payload"]) == b"\xff\xfe\x00"


@pytest.mark.parametrize("payload", [
    b"\x01" * 950_000,  # control characters: JSON escapes each as \u0001, six bytes
    b'"' * 950_000,  # quotes: escaped again inside the dead letter
    bytes(range(256)) * 3_700,  # not UTF-8: base64 grows it by a third
])
def test_a_dead_letter_always_fits_a_kafka_message(payload):
    key = b"k" * 10_000
    encoded, letter = _dead_letter(key, payload, error="e" * 1_000_000)
    assert len(encoded) + len(dead_letter_key(key)) <= DEAD_LETTER_MAX_BYTES
    assert letter["payload_truncated"] is True and letter["payload_encoding"] == "base64"
    kept = base64.b64decode(letter["payload"])
    assert len(kept) > 500_000 and payload.startswith(kept)
    assert letter["payload_bytes"] == len(payload)
    assert letter["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert letter["key_truncated"] is True and letter["key_bytes"] == 10_000 and len(letter["key"]) == 4096
    assert len(letter["error"]) == 2000


@pytest.mark.parametrize(("error", "transient"), [
    (psycopg.OperationalError("connection refused"), True),  # no SQLSTATE: the server never answered
    (psycopg.InterfaceError("the connection is lost"), True),
    (psycopg.errors.AdminShutdown(), True),
    (psycopg.errors.QueryCanceled(), True),
    (psycopg.errors.SerializationFailure(), True),
    (psycopg.errors.DeadlockDetected(), True),
    (psycopg.errors.TooManyConnections(), True),
    (psycopg.errors.LockNotAvailable(), True),
    (psycopg.errors.ProgramLimitExceeded(), False),  # 54000, e.g. an index row too large: the data's fault
    (psycopg.errors.CheckViolation(), False),
    (psycopg.errors.CharacterNotInRepertoire(), False),
    (psycopg.errors.UndefinedColumn(), False),
    (ModelUnavailable("source folder missing"), True),
    (EngineStopped("closed"), True),
    (ValueError("bad text"), False),
])
def test_only_infrastructure_errors_are_transient(error, transient):
    assert is_transient(error) is transient


def test_a_model_that_cannot_load_is_retried_not_isolated():
    calls = []

    async def process(batch):
        calls.append(list(batch))
        if len(calls) <= 4:
            raise ModelUnavailable("model 'x' (v2) cannot be loaded from /gone: FileNotFoundError")

    assert run_isolated([1, 2, 3], process, attempts=2) == []
    assert calls == [[1, 2, 3]] * 5


def test_change_batches_are_big_on_a_gpu_small_on_a_cpu_and_the_setting_wins(tmp_path):
    from segue.agents.worker import CPU_BATCH_SIZE, GPU_BATCH_SIZE, change_batch_size
    from segue.settings import Settings

    assert change_batch_size(Settings(data_dir=tmp_path, device="cpu", batch_size=None)) == CPU_BATCH_SIZE == 64
    assert change_batch_size(Settings(data_dir=tmp_path, device="cuda:0", batch_size=None)) == GPU_BATCH_SIZE == 512
    assert change_batch_size(Settings(data_dir=tmp_path, device="cuda", batch_size=100)) == 100
