"""The Faust app class of a worker: Faust's Kafka transport, with the fetch long-poll Segue sets.

Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``: with nothing to fetch, the
broker holds each fetch that long, and a record published meanwhile waits out the rest of
it (against the embedded broker, a read miss waited 216 ms at the median for its fetch
alone). :class:`SegueApp` takes the wait from ``SEGUE_KAFKA_FETCH_MAX_WAIT_MS`` instead.
"""

from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # read by AIOKafkaConsumer.start()
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class SegueApp(faust.App):
    """A Faust app whose consumers long-poll the broker at most ``fetch_max_wait_ms``."""

    def __init__(self, *args, fetch_max_wait_ms: int, **kwargs):
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)
