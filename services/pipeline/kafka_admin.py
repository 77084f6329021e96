"""Creates the registry's topics at start-up (confluent-kafka AdminClient).

Contract: `ensure_topics(settings)` returns once every topic in the registry
exists; it creates missing ones with the registry's partitions and configs and
leaves existing ones alone (it never changes partition counts). It retries
while the broker is not reachable yet, up to `timeout` seconds.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY

log = logging.getLogger(__name__)


def admin_client(settings: Settings) -> AdminClient:
    """An AdminClient for the configured cluster."""
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


def ensure_topics(settings: Settings, timeout: float = 60.0) -> list[str]:
    """Create every registry topic that does not exist yet; return the names created."""
    admin = admin_client(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = set(admin.list_topics(timeout=5).topics)
            break
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Kafka at {settings.kafka_bootstrap_servers} did not answer: {exc}"
                ) from None
            time.sleep(0.5)
    wanted = [
        NewTopic(
            spec.name(settings),
            num_partitions=spec.partitions_for(settings),
            replication_factor=settings.topic_replication_factor,
            config=dict(spec.configs),
        )
        for spec in REGISTRY.values()
        if spec.name(settings) not in existing
    ]
    created: list[str] = []
    if not wanted:
        return created
    for name, future in admin.create_topics(wanted, request_timeout=30).items():
        try:
            future.result()
            created.append(name)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another service won the race
                raise
    return created
