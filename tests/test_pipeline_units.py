"""Plain-function tests of decoding, batch ordering rules and poison isolation (no services)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from app.isolation import process_isolating_poison
from app.pipeline import ChangeEvent, Envelope, latest_per_document, split_rounds
from schemas.events import DeadLetterReason, InvalidEvent, SourcePosition, decode_change, decode_read_miss


def event(doc_id: str, version: int | None, offset: int) -> ChangeEvent:
    from schemas.events import DocumentChange

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


def run_isolated(items, process, attempts=3):
    poisoned = []

    async def on_poison(item, error):
        poisoned.append((item, str(error)))

    asyncio.run(process_isolating_poison(items, process, on_poison, attempts=attempts, backoff_s=0))
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
