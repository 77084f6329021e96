"""Following the campaign-status topic as the CRM would, from tests."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from services.pipeline.settings import Settings
from tests.support.kafka import client_base


class StatusEvents:
    """A reader of `mailer.campaign-status` that remembers when each event was seen (wall time)."""

    def __init__(self, bootstrap: str | Settings, topic: str) -> None:
        self.consumer = Consumer({
            **client_base(bootstrap), "group.id": f"test-status-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
        })
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.seen: list[tuple[float, dict[str, Any]]] = []

    def wait_for(self, campaign_id: str, status: str, timeout: float = 60.0) -> tuple[float, dict[str, Any]]:
        """(wall time first seen, event) of the campaign's first event with `status`."""
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.seen:
                if event["campaign_id"] == campaign_id and event["status"] == status:
                    return at, event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {status!r} event for {campaign_id} in {timeout}s: {self.seen}")
            msg = self.consumer.poll(0.1)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consumer error: {msg.error()}")
            self.seen.append((time.time(), orjson.loads(msg.value())))

    def close(self) -> None:
        self.consumer.close()
