"""What a batch is, and which change in it wins: the ordering rules of the change pipeline.

Pure functions over decoded records, tested without Kafka or a database: the highest
version per document wins, among equal versions the first, and a version-less Kafka
tombstone beats what came before it in the partition and cuts the batch where its
document appears again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from segue.schemas.events import DocumentChange, SourcePosition


@dataclass(frozen=True)
class Envelope:
    """A raw record as read from Kafka."""

    key: bytes | None
    value: bytes | None
    source: SourcePosition
    timestamp_ms: int | None = None
    replay_of: str | None = None  # the dead letter this record replays (its REPLAY_HEADER), if any

    def key_text(self) -> str | None:
        return self.key.decode(errors="replace") if self.key is not None else None

    def latency_ms(self) -> float | None:
        """Milliseconds from publication to now."""
        return time.time() * 1000 - self.timestamp_ms if self.timestamp_ms else None


@dataclass(frozen=True)
class ChangeEvent:
    """A decoded document change and the record it came in."""

    envelope: Envelope
    change: DocumentChange


def split_rounds(events: Sequence[ChangeEvent]) -> list[list[ChangeEvent]]:
    """Cut a batch where an event follows a version-less tombstone of the same document.

    A tombstone deletes whatever is stored when it is applied, so what came after it
    in the partition must be applied after it, in a later round.
    """
    rounds: list[list[ChangeEvent]] = [[]]
    tombstoned: set[str] = set()
    for event in events:
        doc_id = event.change.doc_id
        if doc_id in tombstoned:
            rounds.append([])
            tombstoned = set()
        rounds[-1].append(event)
        if event.change.version is None:
            tombstoned.add(doc_id)
    return [r for r in rounds if r]


def highest_versions(events: Sequence[ChangeEvent]) -> dict[str, int]:
    """The highest version each document carries in ``events`` (documents with none are absent)."""
    highest: dict[str, int] = {}
    for event in events:
        version = event.change.version
        if version is not None and version > highest.get(event.change.doc_id, -1):
            highest[event.change.doc_id] = version
    return highest


def latest_per_document(events: Sequence[ChangeEvent]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
    """Keep the highest version per doc id (a tombstone beats what came before it).

    Returns (winners, superseded); among equal versions the first one wins.
    """
    winners: dict[str, ChangeEvent] = {}
    superseded: list[ChangeEvent] = []
    for event in events:
        doc_id = event.change.doc_id
        current = winners.get(doc_id)
        if current is None:
            winners[doc_id] = event
        elif event.change.version is None or (
            current.change.version is not None and event.change.version > current.change.version
        ):
            superseded.append(current)
            winners[doc_id] = event
        else:
            superseded.append(event)
    return list(winners.values()), superseded
