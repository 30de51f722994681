"""Retry a failing batch with backoff, then split it until only the poison items remain.

Connection-level database errors (lost connection, deadlock, serialization failure)
are retried until they clear: an outage must not dead-letter good events. Any other
error is retried ``attempts`` times, then the batch is split in halves, recursively,
so only the item that fails on its own reaches ``on_poison``; halves get one try each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import psycopg

log = logging.getLogger("segue.isolation")

T = TypeVar("T")

MAX_BACKOFF_S = 30.0


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying forever: the batch itself is not at fault."""
    return isinstance(error, psycopg.OperationalError)


async def process_isolating_poison(
    items: Sequence[T],
    process: Callable[[Sequence[T]], Awaitable[None]],
    on_poison: Callable[[T, BaseException], Awaitable[None]],
    *,
    attempts: int,
    backoff_s: float,
) -> None:
    """Run ``process(items)``; on repeated failure split and hand single poison items to ``on_poison``."""
    if not items:
        return
    failures = 0
    delay = backoff_s
    while True:
        try:
            await process(items)
            return
        except Exception as error:  # noqa: BLE001 - every failure is isolated, none may stop the worker
            transient = is_transient(error)
            if not transient:
                failures += 1
            log.warning(
                "batch of %d failed (%s%s): %s",
                len(items),
                "transient" if transient else f"attempt {failures}/{attempts}",
                "" if transient else ", will split" if failures >= attempts and len(items) > 1 else "",
                error,
            )
            if failures >= attempts:
                last_error = error
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2 or backoff_s, MAX_BACKOFF_S)
    if len(items) == 1:
        await on_poison(items[0], last_error)
        return
    middle = len(items) // 2
    for half in (items[:middle], items[middle:]):
        # The error already survived its retries: one try per half finds the poison fastest.
        await process_isolating_poison(half, process, on_poison, attempts=1, backoff_s=backoff_s)
