"""The changelog: ``migration_changelog`` rows, the ``activity_counters`` its trigger keeps, and the progress views.

Workers append one row per (event, model) outcome with a binary COPY in the
transaction that wrote the outcome; the control plane appends one ``control`` row per
step it takes. The views (``migration_progress``, ``migration_progress_by_origin``)
read the counters, never the big tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from segue.schemas.changelog import Action, Origin
from segue.schemas.events import MAX_DOC_ID_CHARS
from segue.storage.connections import copy_binary

MAX_CHANGELOG_TEXT_CHARS = 4000


@dataclass(frozen=True)
class ChangelogRow:
    """One (event, model) outcome."""

    doc_id: str | None
    model_version: int | None
    action: Action
    origin: Origin
    doc_version: int | None = None
    event_id: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    tokens_used: int | None = None  # an embedded row: the tokens the model was given (what an API bills)
    tokens_total: int | None = None  # and the text's tokens before truncation (more: it was truncated)
    detail: dict[str, Any] | None = None  # a chunked model's embedded row: {"chunks": n, "chunks_embedded": m}

    def storable(self) -> list[Any]:
        """The row's values as ``migration_changelog`` can always hold them.

        Texts lose NUL characters and are cut (a doc_id to 512 characters, so it fits the
        btree index whatever a bad key held): recording an outcome must never fail on data.
        """
        return [_text(self.doc_id, MAX_DOC_ID_CHARS), self.model_version, self.action.value, self.origin.value,
                self.doc_version, _text(self.event_id, MAX_DOC_ID_CHARS), self.latency_ms,
                _text(self.error, MAX_CHANGELOG_TEXT_CHARS), self.tokens_used, self.tokens_total,
                None if self.detail is None else Jsonb(self.detail)]


def _text(value: str | None, limit: int) -> str | None:
    return None if value is None else value.replace("\x00", "")[:limit]


_COLUMNS = [
    ("doc_id", "text"),
    ("model_version", "int4"),
    ("action", "text"),
    ("origin", "text"),
    ("doc_version", "int8"),
    ("event_id", "text"),
    ("latency_ms", "float8"),
    ("error", "text"),
    ("tokens_used", "int4"),
    ("tokens_total", "int4"),
    ("detail", "jsonb"),
]


async def append(conn: psycopg.AsyncConnection, rows: Sequence[ChangelogRow]) -> None:
    """Append outcome rows with a binary COPY (the activity counters follow by trigger)."""
    if rows:
        await copy_binary(conn, "migration_changelog", _COLUMNS, (r.storable() for r in rows))


def log_control(conn: psycopg.Connection, action: Action, *, model_version: int | None, detail: dict[str, Any],
                event_id: str | None = None, error: str | None = None) -> None:
    """Append one ``control`` row: a step of the control plane and what it did (``error``: why it failed)."""
    conn.execute(
        "INSERT INTO migration_changelog (model_version, action, origin, event_id, error, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (model_version, action.value, Origin.CONTROL.value, event_id,
         None if error is None else _text(error, MAX_CHANGELOG_TEXT_CHARS), Jsonb(detail)),
    )


def index_failures(conn: psycopg.Connection, model_version: int) -> tuple[int, str | None]:
    """(failed HNSW builds of model ``model_version``, the last one's error)."""
    return conn.execute(
        "SELECT count(*), (array_agg(error ORDER BY id DESC))[1] FROM migration_changelog"
        " WHERE action = %s AND model_version = %s",
        (Action.INDEX_FAILED.value, model_version),
    ).fetchone()


def latest_detail(conn: psycopg.Connection, action: Action) -> dict[str, Any] | None:
    """The detail of the latest ``action`` row, if any."""
    row = conn.execute("SELECT detail FROM migration_changelog WHERE action = %s ORDER BY id DESC LIMIT 1",
                       (action.value,)).fetchone()
    return row[0] if row else None


def events_logged(conn: psycopg.Connection, event_ids: Sequence[str]) -> int:
    """How many of ``event_ids`` have at least one row."""
    return conn.execute("SELECT count(DISTINCT event_id) FROM migration_changelog WHERE event_id = ANY(%s)",
                        (list(event_ids),)).fetchone()[0]


def outcomes(conn: psycopg.Connection) -> list[tuple]:
    """(origin, model name or '–', action, events, p50 latency ms, p95 latency ms) over the whole changelog."""
    return conn.execute(
        "SELECT c.origin, coalesce(m.name, '–'), c.action, count(*),"
        " round(percentile_cont(0.5) WITHIN GROUP (ORDER BY c.latency_ms)::numeric),"
        " round(percentile_cont(0.95) WITHIN GROUP (ORDER BY c.latency_ms)::numeric)"
        " FROM migration_changelog c LEFT JOIN embedding_models m ON m.version = c.model_version"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()


def dead_letters_by_reason(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """(reason, events) of every ``dead_lettered`` row."""
    return conn.execute("SELECT split_part(error, ':', 1), count(*) FROM migration_changelog"
                        " WHERE action = 'dead_lettered' GROUP BY 1 ORDER BY 1").fetchall()


def rows_of(conn: psycopg.Connection, action: Action) -> int:
    """Rows of ``action`` in the whole changelog."""
    return conn.execute("SELECT count(*) FROM migration_changelog WHERE action = %s", (action.value,)).fetchone()[0]


def freshness(conn: psycopg.Connection) -> list[tuple]:
    """(origin, outcomes, p50 s, p95 s, dead letters) of the last 5 minutes' outcomes, publish → commit."""
    return conn.execute(
        "SELECT origin, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) / 1000,"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) / 1000,"
        " count(*) FILTER (WHERE action = 'dead_lettered')"
        " FROM migration_changelog WHERE at > now() - interval '5 minutes' AND origin <> 'control'"
        " GROUP BY origin ORDER BY origin"
    ).fetchall()


def dead_letters_last_day(conn: psycopg.Connection) -> int:
    """Events dead-lettered in the last 24 hours (any model or none), from the activity counters."""
    (events,) = conn.execute(
        "SELECT coalesce(sum(events), 0) FROM activity_counters"
        " WHERE action = 'dead_lettered' AND minute >= now() - interval '24 hours'"
    ).fetchone()
    return int(events)


def progress(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Rows of the ``migration_progress`` view, one per live model, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM migration_progress ORDER BY model_version").fetchall()


def progress_by_origin(conn: psycopg.Connection) -> list[tuple]:
    """(model version, model, origin, vectors in the last 5 minutes, in the last 24 hours) per live model."""
    return conn.execute(
        "SELECT model_version, model, origin, vectors_last_5m, vectors_last_24h FROM migration_progress_by_origin"
        " ORDER BY model_version, origin"
    ).fetchall()
