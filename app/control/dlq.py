"""Dead letters, read back and replayed: ``segue dlq list`` and ``segue dlq replay``.

A replay re-publishes a dead letter's original record, with its original key, to the
topic it came from, once its cause is fixed (a model registered, a producer mended).
Each replayed letter is recorded in ``dead_letter_replays`` by its own coordinates and
the replayed record carries them in a ``segue-replay-of`` header, so replaying the same
letters again does nothing, and replays run one at a time (an advisory lock): a second
waits for the first, then finds its letters replayed. A replay that fails again makes a
letter marked ``replay_of``, which is reported, not replayed in a loop. A letter whose
payload was cut to fit cannot be replayed, nor can a Kafka tombstone (a null value): it has
no version, so it is ordered by its offset, and replayed at a new offset it could delete a
document written after the original.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from segue.schemas.events import REPLAY_HEADER, InvalidEvent, decode_dead_letter
from segue.settings import Settings
from segue.storage.locks import Lock, held

log = logging.getLogger("segue.control.dlq")

READ_IDLE_MS = 1000  # the topic is read to its end: stop after this long without a record


@dataclass(frozen=True)
class StoredLetter:
    """A record of the dead-letter topic, decoded."""

    partition: int
    offset: int
    reason: str
    error: str
    source: str  # topic/partition/offset of the original
    source_topic: str
    key: bytes | None
    payload: bytes | None
    truncated: bool
    failed_at: datetime
    replay_of: str | None

    @property
    def coordinates(self) -> str:
        return f"{self.partition}/{self.offset}"

    @property
    def doc_id(self) -> str | None:
        return self.key.decode(errors="replace") if self.key is not None else None


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did with the letters it was given."""

    replayed: list[StoredLetter]
    already: list[StoredLetter]  # replayed before
    failed_again: list[StoredLetter]  # letters of replays that failed again: their cause is not fixed
    truncated: list[StoredLetter]  # payload cut to fit: the original is not whole
    tombstones: list[StoredLetter]  # null values: no version to order a replay by


def _bytes(text: str | None, encoding: str | None) -> bytes | None:
    if text is None:
        return None
    return base64.b64decode(text) if encoding == "base64" else text.encode()


def decode_letter(partition: int, offset: int, value: bytes | None) -> StoredLetter:
    """A dead-letter record's value, read back: the original key and payload as bytes.

    Raises :class:`~segue.schemas.events.InvalidEvent` for a record that is not a dead letter.
    """
    letter = decode_dead_letter(value)
    source = letter["source"]
    return StoredLetter(
        partition=partition, offset=offset, reason=letter["reason"], error=letter["error"],
        source=f"{source['topic']}/{source['partition']}/{source['offset']}", source_topic=source["topic"],
        key=_bytes(letter["key"], letter.get("key_encoding")),
        payload=_bytes(letter["payload"], letter["payload_encoding"]),
        truncated=bool(letter.get("payload_truncated") or letter.get("key_truncated")),
        failed_at=datetime.fromisoformat(letter["failed_at"]),
        replay_of=letter.get("replay_of"),
    )


async def read_letters(settings: Settings, bootstrap: str, *, reason: str | None = None,
                       since: datetime | None = None, doc_id: str | None = None) -> list[StoredLetter]:
    """Every dead letter on the topic (oldest first), filtered by reason, failure time and doc_id."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        await consumer.start()
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        partitions = [TopicPartition(settings.topic_dead_letters, p)
                      for p in sorted(consumer.partitions_for_topic(settings.topic_dead_letters) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        letters = []
        while batches := await consumer.getmany(timeout_ms=READ_IDLE_MS):
            for record in (r for records in batches.values() for r in records):
                try:
                    letters.append(decode_letter(record.partition, record.offset, record.value))
                except InvalidEvent as error:  # someone else's record: said, not listed, never replayed
                    log.warning("%s/%d@%d is not a dead letter, skipped: %s", record.topic, record.partition,
                                record.offset, error)
    finally:
        await consumer.stop()
    letters.sort(key=lambda letter: (letter.failed_at, letter.partition, letter.offset))
    return [letter for letter in letters
            if (reason is None or letter.reason == reason) and (since is None or letter.failed_at >= since)
            and (doc_id is None or letter.doc_id == doc_id)]


async def replay(settings: Settings, conn: psycopg.Connection, bootstrap: str, letters: Sequence[StoredLetter], *,
                 dry_run: bool) -> ReplayReport:
    """Re-publish the letters not replayed before; record each once the broker acknowledged it.

    Holds :attr:`Lock.DLQ_REPLAY` throughout (``conn`` autocommit), so concurrent replays publish each letter once.
    """
    with held(conn, Lock.DLQ_REPLAY):
        done = {(p, o) for p, o in conn.execute(
            "SELECT partition, \"offset\" FROM dead_letter_replays WHERE topic = %s", (settings.topic_dead_letters,))}
        report = ReplayReport(replayed=[], already=[], failed_again=[], truncated=[], tombstones=[])
        for letter in letters:
            if (letter.partition, letter.offset) in done:
                report.already.append(letter)
            elif letter.replay_of:
                report.failed_again.append(letter)
            elif letter.truncated:
                report.truncated.append(letter)
            elif letter.payload is None:
                report.tombstones.append(letter)
            else:
                report.replayed.append(letter)
        if report.replayed and not dry_run:
            await _publish(settings, conn, bootstrap, report.replayed)
    return report


async def _publish(settings: Settings, conn: psycopg.Connection, bootstrap: str,
                   letters: Sequence[StoredLetter]) -> None:
    """Send each letter's original to its source topic, recording it replayed once the broker has it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        await producer.start()
        for letter in letters:
            delivery = await producer.send(
                letter.source_topic, key=letter.key, value=letter.payload,
                headers=[(REPLAY_HEADER, f"{settings.topic_dead_letters}/{letter.coordinates}".encode())])
            await delivery
            with conn.transaction():
                conn.execute(
                    "INSERT INTO dead_letter_replays (topic, partition, \"offset\", reason, source)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (settings.topic_dead_letters, letter.partition, letter.offset, letter.reason, letter.source))
    finally:
        await producer.stop()
