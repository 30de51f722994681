"""Worker heartbeats in SQL: each worker upserts its row every few seconds; ``segue status`` reads them.

A worker that stops (SIGTERM, Ctrl-C) writes the state ``stopped``, which later beats of it
never overwrite; one whose last beat is older than ``lost_after_s`` without that is lost
(killed, partitioned away, stuck). Rows of workers gone for a day are deleted by the beats
of the others.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class Beat:
    """What a worker reports about itself."""

    worker_id: str
    started_at: datetime
    state: str
    partitions: list[str]
    lag: dict[str, int]
    models: list[str]
    device: str | None
    events_per_s: float
    metrics_url: str | None
    halted: dict[str, str]  # model name: why this worker stopped writing it


def worker_id(started_at: datetime) -> str:
    """This process's id: host, pid and start time (a restarted pid is another worker)."""
    return f"{socket.gethostname()}:{os.getpid()}:{started_at:%Y%m%dT%H%M%S}"


async def beat(conn: psycopg.AsyncConnection, b: Beat) -> None:
    """Upsert this worker's row and delete rows of workers gone for a day."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO workers (worker_id, host, pid, started_at, last_beat, state, partitions, lag, models, device,"
            " events_per_s, metrics_url, halted) VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (worker_id) DO UPDATE SET last_beat = now(), state = excluded.state,"
            " partitions = excluded.partitions, lag = excluded.lag, models = excluded.models,"
            " device = excluded.device, events_per_s = excluded.events_per_s, metrics_url = excluded.metrics_url,"
            " halted = excluded.halted WHERE workers.state <> 'stopped'",
            (b.worker_id, socket.gethostname(), os.getpid(), b.started_at, b.state, Jsonb(b.partitions),
             Jsonb(b.lag), Jsonb(b.models), b.device, b.events_per_s, b.metrics_url, Jsonb(b.halted)),
        )
        await conn.execute("DELETE FROM workers WHERE last_beat < now() - interval '1 day'")


async def stopped(conn: psycopg.AsyncConnection, worker_id: str) -> None:
    """Record that worker ``worker_id`` stopped: ``segue status`` shows it stopped, not lost."""
    await conn.execute("UPDATE workers SET state = 'stopped', last_beat = now(), partitions = '[]', lag = '{}'"
                       " WHERE worker_id = %s", (worker_id,))


def list_workers(conn: psycopg.Connection, *, lost_after_s: float) -> list[dict]:
    """Every worker row, with ``live`` (beat within ``lost_after_s``, not stopped) and ``silent_s``, live ones
    first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT *, extract(epoch FROM now() - last_beat) AS silent_s,"
            " last_beat > now() - make_interval(secs => %s) AND state <> 'stopped' AS live"
            " FROM workers ORDER BY last_beat > now() - make_interval(secs => %s) AND state <> 'stopped' DESC,"
            " host, pid",
            (lost_after_s, lost_after_s),
        ).fetchall()
