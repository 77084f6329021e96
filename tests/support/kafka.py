"""Reading and writing topics directly in tests (confluent-kafka).

Every helper takes the broker as `Settings` (its security settings apply, as in the
services: services/pipeline/kafka_clients.py) or as plain bootstrap servers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from services.pipeline.kafka_clients import client_config
from services.pipeline.settings import Settings


def client_base(broker: str | Settings) -> dict[str, Any]:
    """The pipeline's client configuration for `broker` (settings, or bootstrap servers)."""
    settings = broker if isinstance(broker, Settings) else replace(Settings(), kafka_bootstrap_servers=broker)
    return client_config(settings)


def read_topic(bootstrap: str | Settings, topic: str, *, expect: int | None = None,
               idle: float = 3.0, timeout: float = 60.0) -> list[Message]:
    """Every message of `topic`: until `expect` arrived, or nothing came for `idle` s."""
    consumer = Consumer({
        **client_base(bootstrap),
        "group.id": f"test-reader-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    # assign, not subscribe: no group join (which takes session.timeout/2 on tansu)
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if expect is None and messages and time.monotonic() - last > idle:
                    break
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consumer error: {msg.error()}")
            messages.append(msg)
            last = time.monotonic()
            if expect is not None and len(messages) >= expect:
                break
    finally:
        consumer.close()
    return messages


def produce_raw(bootstrap: str | Settings, topic: str,
                items: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce (key, value) pairs as they are: for malformed input."""
    producer = Producer(client_base(bootstrap))
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:  # e.g. Kafka refuses a keyless message on a compacted topic
            errors.append(str(err))

    for key, value in items:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not errors, f"the broker refused {len(errors)} of {len(items)} messages: {errors[:3]}"
