"""Read-miss events from a reader: deduplicated, rate-bounded, fire-and-forget.

A search that returns documents lacking a current vector for the read model offers
them here; each (document, model) is published at most once per ``dedup_s`` and at most
``rate`` a second, a second's worth at once (more are dropped and counted, never
waited for), by an aiokafka
producer on a private event-loop thread, so publishing never slows a query.
:meth:`ReadMissPublisher.close` flushes what is queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from segue.ratelimit import per_second
from segue.schemas.events import encode_read_miss
from segue.settings import Settings

log = logging.getLogger("segue.client.readmisses")

FLUSH_TIMEOUT_S = 10.0


class ReadMissPublisher:
    """Publishes read misses for the reader that owns it (``rate`` 0 publishes none)."""

    def __init__(self, settings: Settings, rate: float, dedup_s: float):
        if rate < 0 or dedup_s < 0:
            raise ValueError("read_miss_rate and read_miss_dedup_s must not be negative")
        self._settings = settings
        # A search misses up to k documents at once: a second's worth may go out together.
        self._limiter = per_second(rate, burst=max(1, int(rate))) if rate > 0 else None
        self._dedup_s = dedup_s
        self._recent: dict[tuple[str, str], float] = {}  # insertion order is time order
        self._counts = {"published": 0, "deduplicated": 0, "dropped": 0, "failed": 0}
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._producer: AIOKafkaProducer | None = None
        self._start_lock: asyncio.Lock | None = None
        self._closed = False

    def stats(self) -> dict[str, int]:
        """Events published, deduplicated, dropped over the rate bound, and failed."""
        with self._lock:
            return dict(self._counts)

    def offer(self, doc_ids: Sequence[str], model: str) -> list[str]:
        """Queue an event per document not sent within the dedup window, while the rate allows; returns those queued."""
        queued: list[str] = []
        with self._lock:
            if self._closed:
                return queued
            now = time.monotonic()
            while self._recent and now - next(iter(self._recent.values())) >= self._dedup_s:
                del self._recent[next(iter(self._recent))]
            for doc_id in dict.fromkeys(doc_ids):
                if (doc_id, model) in self._recent:
                    self._counts["deduplicated"] += 1
                elif self._limiter is None or not self._limiter.try_acquire("read-misses", blocking=False):
                    self._counts["dropped"] += 1
                else:
                    self._recent[(doc_id, model)] = now
                    queued.append(doc_id)
            if queued and self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="segue-read-misses", daemon=True)
                self._thread.start()
            for doc_id in queued:
                future = asyncio.run_coroutine_threadsafe(self._send(doc_id, model), self._loop)
                self._pending.add(future)
                future.add_done_callback(self._settled)
        return queued

    def close(self) -> None:
        """Wait for queued events to be acknowledged, then stop the producer and the loop thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if self._limiter is not None:
            self._limiter.close()
        if self._loop is None:
            return
        concurrent.futures.wait(pending, timeout=FLUSH_TIMEOUT_S)
        try:
            asyncio.run_coroutine_threadsafe(self._stop_producer(), self._loop).result(FLUSH_TIMEOUT_S)
        except Exception:
            log.warning("the read-miss producer did not stop cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _settled(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    # -- on the loop thread -----------------------------------------------------------------

    async def _send(self, doc_id: str, model: str) -> None:
        value = encode_read_miss(doc_id, model, f"read-miss-{uuid.uuid4().hex}")
        try:
            producer = await self._started_producer()
            delivery = await producer.send(self._settings.topic_read_misses, key=doc_id.encode(), value=value)
            await delivery
        except Exception as exc:
            log.warning("could not publish a read miss for %r (%s): %s", doc_id, model, exc)
            with self._lock:
                self._counts["failed"] += 1
                self._recent.pop((doc_id, model), None)  # let a later search try again
        else:
            with self._lock:
                self._counts["published"] += 1

    async def _started_producer(self) -> AIOKafkaProducer:
        self._start_lock = self._start_lock or asyncio.Lock()  # made on the loop it guards
        async with self._start_lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self._settings.kafka_bootstrap,
                                            client_id="segue-reader", linger_ms=5)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
        return self._producer

    async def _stop_producer(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
