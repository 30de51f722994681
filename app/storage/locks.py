"""PostgreSQL advisory locks: every lock id Segue takes, and the ways to take one.

Workers, the CLI and readers on many hosts coordinate through these: one schema
upgrade at a time, one sweeper, one index builder, one dead-letter replay, one adapter refit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import IntEnum

import psycopg


class Lock(IntEnum):
    """Advisory lock ids (one 64-bit key space per database)."""

    SCHEMA = 0x5E6E  # schema upgrades
    SWEEPER = 0x5E6F  # the sweeper's step
    INDEX_BUILD = 0x5E70  # HNSW index builds
    DLQ_REPLAY = 0x5E71  # segue dlq replay: one replay at a time, so each letter is published once
    ADAPTER_FIT = 0x5E72  # workers' adapter refits: one worker fits, the others read its result


@contextlib.contextmanager
def held(conn: psycopg.Connection, lock: Lock) -> Iterator[None]:
    """Hold ``lock`` for the block, waiting for it if another session has it (an autocommit connection)."""
    conn.execute("SELECT pg_advisory_lock(%s)", (int(lock),))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (int(lock),))


@contextlib.contextmanager
def held_if_free(conn: psycopg.Connection, lock: Lock) -> Iterator[bool]:
    """Hold ``lock`` for the block if no other session has it; yields whether it is held."""
    (acquired,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (int(lock),)).fetchone()
    try:
        yield acquired
    finally:
        if acquired:
            conn.execute("SELECT pg_advisory_unlock(%s)", (int(lock),))


async def take_for_transaction(cur: psycopg.AsyncCursor, lock: Lock) -> bool:
    """Take ``lock`` until the current transaction ends, if no other session has it; whether it was taken."""
    await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (int(lock),))
    return (await cur.fetchone())[0]
