"""Retry a failing batch with backoff, then split it until only the poison items remain.

Errors fall in two classes (see README, "Delivery guarantees"):

* transient — the infrastructure, not the batch, is at fault: a lost or refused
  database connection, deadlock or serialization failure, cancel or shutdown,
  resource exhaustion, a lock timeout (SQLSTATE classes 08, 40, 53, 57, 58 and
  55P03), or an :class:`~segue.errors.InfrastructureError` (a model that cannot load,
  a stopped engine). These are retried with capped backoff until they clear: an
  outage never dead-letters good events.
* anything else is the batch's fault: retried ``attempts`` times, then the batch is
  split in halves, recursively, so only the item that fails on its own reaches
  ``on_poison``; halves get one try each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import psycopg

from segue import metrics
from segue.errors import InfrastructureError

log = logging.getLogger("segue.worker.isolation")

T = TypeVar("T")

MAX_BACKOFF_S = 30.0
TRANSIENT_SQLSTATES = ("08", "40", "53", "57", "58", "55P03")  # classes, and lock_not_available
LOCK_SQLSTATES = ("55P03", "40P01", "40001")  # lock timeout, deadlock, serialization failure
LOUD_AFTER = 5  # consecutive transient failures before each one is logged as an error


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying forever: the batch itself is not at fault."""
    if isinstance(error, InfrastructureError):
        return True
    if isinstance(error, psycopg.Error):
        if error.sqlstate is None:  # no answer from the server: the connection failed or is gone
            return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))
        return error.sqlstate.startswith(TRANSIENT_SQLSTATES)
    return False


def _count_retry(label: str, error: BaseException, transient: bool) -> None:
    metrics.RETRIES.labels(label, "transient" if transient else "failure").inc()
    if transient and isinstance(error, psycopg.Error):
        state = error.sqlstate or "08"  # no SQLSTATE: the connection failed
        kind = "connection" if state.startswith("08") else "lock" if state in LOCK_SQLSTATES else "other"
        metrics.DB_ERRORS.labels(kind).inc()


def next_delay(delay: float, backoff_s: float) -> float:
    """The next backoff delay: doubled, at least ``backoff_s``, at most ``MAX_BACKOFF_S``."""
    return min(max(delay * 2, backoff_s), MAX_BACKOFF_S)


async def retry_forever(run: Callable[[], Awaitable[T]], *, what: str, backoff_s: float, label: str) -> T:
    """Await ``run()`` until it succeeds, logging each failure; the caller must not give up on the work.

    ``label`` names the topic the work is for, on the retry metrics.
    """
    delay = backoff_s
    failures = 0
    while True:
        try:
            return await run()
        except Exception as error:  # noqa: BLE001 - retried, never swallowed
            failures += 1
            _count_retry(label, error, is_transient(error))
            level = logging.ERROR if failures >= LOUD_AFTER else logging.WARNING
            log.log(level, "%s failed (%d in a row, retrying in %.1fs): %s: %s", what, failures, delay,
                    type(error).__name__, error, exc_info=failures == LOUD_AFTER)
            await asyncio.sleep(delay)
            delay = next_delay(delay, backoff_s)


async def process_isolating_poison(
    items: Sequence[T],
    process: Callable[[Sequence[T]], Awaitable[None]],
    on_poison: Callable[[T, BaseException], Awaitable[None]],
    *,
    attempts: int,
    backoff_s: float,
    label: str,
) -> None:
    """Run ``process(items)``; on repeated failure split and hand single poison items to ``on_poison``.

    ``label`` names the topic the items came from, on the retry metrics.
    """
    if not items:
        return
    failures = 0
    transient_failures = 0
    delay = backoff_s
    while True:
        try:
            await process(items)
            return
        except Exception as error:  # noqa: BLE001 - every failure is isolated, none may stop the worker
            _count_retry(label, error, is_transient(error))
            if is_transient(error):
                transient_failures += 1
                level = logging.ERROR if transient_failures >= LOUD_AFTER else logging.WARNING
                log.log(level, "batch of %d failed (transient, %d in a row; retrying in %.1fs): %s: %s",
                        len(items), transient_failures, delay, type(error).__name__, error)
            else:
                failures += 1
                log.warning("batch of %d failed (attempt %d/%d%s): %s: %s", len(items), failures, attempts,
                            ", will split" if failures >= attempts and len(items) > 1 else "",
                            type(error).__name__, error)
                if failures >= attempts:
                    last_error = error
                    break
            await asyncio.sleep(delay)
            delay = next_delay(delay, backoff_s)
    if len(items) == 1:
        await on_poison(items[0], last_error)
        return
    middle = len(items) // 2
    for half in (items[:middle], items[middle:]):
        # The error already survived its retries: one try per half finds the poison fastest.
        await process_isolating_poison(half, process, on_poison, attempts=1, backoff_s=backoff_s, label=label)
