"""The changelog's vocabulary: what happened to an event (:class:`Action`) and where it came from (:class:`Origin`).

``migration_changelog``'s CHECK constraints allow exactly these values; a test compares
the two, so a new action is added here and in an upgrade step together.
"""

from __future__ import annotations

from enum import Enum


class Action(str, Enum):
    """What one (event, model) outcome or control step was."""

    EMBEDDED = "embedded"
    UNCHANGED = "unchanged"
    SUPERSEDED = "superseded"
    DELETED = "deleted"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    MIGRATION_STARTED = "migration_started"
    MIGRATION_PAUSED = "migration_paused"
    MIGRATION_RESUMED = "migration_resumed"
    MIGRATION_READY = "migration_ready"
    MIGRATION_CUT_OVER = "migration_cut_over"
    MIGRATION_ROLLED_BACK = "migration_rolled_back"
    MIGRATION_FINISHED = "migration_finished"
    MIGRATION_ABORTED = "migration_aborted"
    INDEX_BUILT = "index_built"
    INDEX_FAILED = "index_failed"
    IMPORTED = "imported"
    BILLED = "billed"  # tokens an API model's endpoint billed a worker for (tokens_used), a few seconds' worth


class Origin(str, Enum):
    """Where the event behind a changelog row came from."""

    CHANGE = "change"
    READ_MISS = "read_miss"
    BACKFILL = "backfill"
    CONTROL = "control"
