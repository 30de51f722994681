"""Creates Segue's topics when they are missing (Faust does not create source topics)."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.settings import Settings

log = logging.getLogger("segue.topics")


def topic_names(settings: Settings) -> list[str]:
    """Every topic Segue reads or writes."""
    return [settings.topic_document_changes, settings.topic_read_misses, settings.topic_backfill,
            settings.topic_dead_letters]


async def ensure_topics(settings: Settings, bootstrap: str) -> list[str]:
    """Create the missing topics with the configured partitions; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="segue-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in topic_names(settings) if name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(name, settings.topic_partitions, settings.topic_replication) for name in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another worker created them first
            log.info("created topics %s with %d partitions", ", ".join(missing), settings.topic_partitions)
        return missing
    finally:
        await admin.close()


async def consumer_lag(settings: Settings, bootstrap: str) -> dict[str, int]:
    """Records not yet committed by the worker group, per topic it consumes."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topics = [settings.topic_document_changes, settings.topic_read_misses, settings.topic_backfill]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="segue-admin")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in (consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            await consumer.topics()  # refresh metadata once
            partitions = [
                TopicPartition(topic, p) for topic in topics for p in (consumer.partitions_for_topic(topic) or ())
            ]
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(settings.group_id, partitions=partitions)
        lag = {topic: 0 for topic in topics}
        for tp in partitions:
            done = committed.get(tp)
            lag[tp.topic] += ends[tp] - (done.offset if done is not None and done.offset >= 0 else 0)
        return lag
    finally:
        await consumer.stop()
        await admin.close()
