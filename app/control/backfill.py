"""The backfill: enqueue every document whose vector for a model is missing or stale.

Walks ``documents`` in primary-key order with keyset pages after a watermark kept in
``backfill_progress``, publishes one record per document to the backfill topic (which
workers consume behind read misses and live changes), and advances the watermark
only after the broker acknowledged the page, so a killed backfill resumes where it
stopped and at worst re-publishes one page (re-embedding is idempotent). Bounded by a
rate (docs/s) and a budget (documents, or GPU-seconds at a measured throughput);
stops when the migration is paused, or its model retired (an aborted migration).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaProducer
from psycopg import errors
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from segue.control import migration, registry
from segue.ratelimit import per_second
from segue.schemas.events import encode_read_miss
from segue.settings import Settings
from segue.spec import ModelSpec
from segue.storage import documents


@dataclass(frozen=True)
class BackfillLimits:
    """How much one run may publish: docs/s, documents, GPU-seconds at ``throughput`` docs/s, or dollars of
    an API model's tokens at ``price_per_million_tokens``, counted by ``count_tokens`` (tokens after truncation)."""

    rate: float | None = None
    max_docs: int | None = None
    max_gpu_seconds: float | None = None
    throughput: float | None = None
    max_usd: float | None = None
    price_per_million_tokens: float | None = None
    count_tokens: Callable[[list[str]], list[int]] | None = None

    def doc_budget(self) -> int | None:
        """The document budget of this run (the tighter of the two budgets)."""
        budgets = [self.max_docs] if self.max_docs is not None else []
        if self.max_gpu_seconds is not None:
            if not self.throughput:
                raise ValueError("a GPU-seconds budget needs a throughput (docs/s) to convert it")
            budgets.append(int(self.max_gpu_seconds * self.throughput))
        return min(budgets) if budgets else None


@dataclass(frozen=True)
class BackfillOutcome:
    published: int
    stopped: str  # "complete", "budget", "paused" or "retired"
    watermark: str | None
    seconds: float
    tokens: int = 0  # counted for a dollar budget: the tokens of the documents published
    usd: float = 0.0

    def describe(self, limits: BackfillLimits) -> str:
        rate = self.published / self.seconds if self.seconds else 0.0
        head = f"published {self.published} documents in {self.seconds:.1f}s ({rate:.1f} docs/s)"
        if self.stopped == "complete":
            return f"{head}; backfill complete: every document was enqueued"
        if self.stopped == "paused":
            return f"{head}; stopped: the migration is paused (resume continues after {self.watermark!r})"
        if self.stopped == "retired":
            return f"{head}; stopped: the model was retired (its migration was aborted)"
        budget = f"{limits.max_docs} documents" if limits.max_docs is not None else ""
        if limits.max_gpu_seconds is not None:
            gpu = f"{limits.max_gpu_seconds:g} GPU-seconds ≈ {limits.doc_budget()} documents at {limits.throughput:.1f} docs/s"
            budget = f"{budget} / {gpu}" if budget else gpu
        if limits.max_usd is not None:
            usd = (f"${limits.max_usd:g}: {self.tokens:,} tokens spent ≈ ${self.usd:.4f} at "
                   f"${limits.price_per_million_tokens:g} per 1M tokens")
            budget = f"{budget} / {usd}" if budget else usd
        return f"{head}; stopped at the budget ({budget}); run again to continue after {self.watermark!r}"


def _watermark(conn: psycopg.Connection, model: ModelSpec) -> str | None:
    """The watermark to resume after; a finished pass starts over from the beginning."""
    with conn.transaction():
        row = conn.execute(
            "SELECT watermark, finished_at FROM backfill_progress WHERE model_version = %s FOR UPDATE",
            (model.version,),
        ).fetchone()
        if row is None or row[1] is not None:
            conn.execute(
                "INSERT INTO backfill_progress (model_version) VALUES (%s) ON CONFLICT (model_version) DO UPDATE"
                " SET watermark = NULL, published = 0, started_at = now(), updated_at = now(), finished_at = NULL",
                (model.version,),
            )
            return None
        return row[0]


def _affordable(page: list[tuple[str, str]], limits: BackfillLimits, spent_tokens: int) -> list[int]:
    """The token counts of the page's longest prefix the dollar budget still pays for."""
    counts = limits.count_tokens([body for _, body in page])
    budget_tokens = int(limits.max_usd / limits.price_per_million_tokens * 1e6) - spent_tokens
    kept: list[int] = []
    for count in counts:
        if count > budget_tokens:
            break
        kept.append(count)
        budget_tokens -= count
    return kept


def _paused(conn: psycopg.Connection) -> bool:
    active = migration.active_migration(conn)
    return active is not None and active.state == "paused"


async def run_backfill(
    settings: Settings,
    conn: psycopg.Connection,
    bootstrap: str,
    model: ModelSpec,
    limits: BackfillLimits,
    *,
    page_size: int = 500,
    console: Console | None = None,
) -> BackfillOutcome:
    """Publish the documents ``model`` lacks a current vector for, within ``limits``.

    Raises the broker's error if a record of a page is not acknowledged; the watermark
    then stays before that page, so the next run publishes it again. A model Segue cannot
    embed with (adopted vectors) is refused with a RegistryError.
    """
    registry.require_embedded(model)
    if limits.max_usd is not None and not (limits.price_per_million_tokens and limits.count_tokens):
        raise registry.RegistryError(f"model {model.name!r} has no registered price per 1M tokens: a dollar budget "
                                     "needs one (--option price_per_million_tokens=…)")
    budget = limits.doc_budget()
    after = _watermark(conn, model)
    current, total = migration.vector_counts(conn, model.version)
    todo = total - current
    planned = todo if budget is None else min(todo, budget)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    pace = per_second(limits.rate) if limits.rate else None
    published = tokens = 0
    started = time.perf_counter()
    stopped = "complete"
    progress = Progress(
        TextColumn(f"backfill {model.name}: enqueued"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} docs/s"), TimeRemainingColumn(),
        console=console, disable=console is None, transient=False,
    )
    try:
        await producer.start()
        with progress:
            task = progress.add_task("backfill", total=planned, rate=0.0)
            while True:
                if _paused(conn):
                    stopped = "paused"
                    break
                size = page_size if budget is None else min(page_size, budget - published)
                if size <= 0:
                    stopped = "budget"
                    break
                try:
                    page = documents.lacking(conn, model.version, after, size, with_body=limits.max_usd is not None)
                except errors.UndefinedColumn:  # an abort retired the model and dropped its column meanwhile
                    stopped = "retired"
                    break
                if not page:
                    conn.execute("UPDATE backfill_progress SET finished_at = now(), updated_at = now()"
                                 " WHERE model_version = %s", (model.version,))
                    break
                if limits.max_usd is not None:
                    counts = _affordable(page, limits, tokens)
                    tokens += sum(counts)
                    if len(counts) < len(page):
                        stopped = "budget"
                        page = page[: len(counts)]
                        if not page:
                            break
                deliveries = []
                for doc_id, _ in page:
                    if pace is not None:
                        await pace.try_acquire_async("backfill")
                    deliveries.append(await producer.send(
                        settings.topic_backfill, key=doc_id.encode(),
                        value=encode_read_miss(doc_id, model.name, f"backfill-{model.version}")))
                # Every record of the page acknowledged, or this raises and the watermark stays put.
                await asyncio.gather(*deliveries)
                published += len(page)
                progress.update(task, completed=published, rate=published / max(time.perf_counter() - started, 1e-9))
                after = page[-1][0]
                conn.execute(
                    "UPDATE backfill_progress SET watermark = %s, published = published + %s, updated_at = now()"
                    " WHERE model_version = %s",
                    (after, len(page), model.version),
                )
                if stopped == "budget":
                    break
    finally:
        await producer.stop()
        if pace is not None:
            pace.close()
    usd = tokens / 1e6 * limits.price_per_million_tokens if limits.max_usd is not None else 0.0
    return BackfillOutcome(published, stopped, after, time.perf_counter() - started, tokens, usd)
