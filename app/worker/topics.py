"""Creates Segue's topics when they are missing (Faust does not create source topics)."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from segue.settings import Settings

log = logging.getLogger("segue.worker.topics")


def topic_names(settings: Settings) -> list[str]:
    """Every topic Segue reads or writes."""
    return [settings.topic_document_changes, settings.topic_read_misses, settings.topic_backfill,
            settings.topic_dead_letters]


async def ensure_topics(settings: Settings, bootstrap: str) -> list[str]:
    """Create the missing topics with the configured partitions; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="segue-admin")
    try:
        await admin.start()
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

