"""`mailer ops dead-letters`: the newest messages the services could not accept, and why.

Contract: `newest_dead_letters(settings, limit)` reads the dead-letter topic
with an unsubscribed consumer (no group, nothing committed) from each
partition's start to the high watermark the fetch reports (right on tansu
and on Kafka alike), and returns the newest `limit` events, newest first,
without their original payloads (those may hold addresses; `--payload`
adds them back decoded).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from services.ops.render import table, when
from services.pipeline.kafka_clients import client_config
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, spec, topic_name


def newest_dead_letters(settings: Settings, limit: int, payload: bool = False,
                        timeout: float = 10.0) -> list[dict[str, Any]]:
    """The newest `limit` dead letters, newest first."""
    topic = topic_name(Topic.DEAD_LETTERS, settings)
    partitions = spec(Topic.DEAD_LETTERS).partitions_for(settings)
    consumer = Consumer({
        **client_config(settings), "group.id": "mailer-ops-unused",
        "enable.auto.commit": False, "enable.partition.eof": True,
    })
    events: list[dict[str, Any]] = []
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < partitions and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    done.add(int(msg.partition() or 0))
                continue
            events.append(_event(msg.value() or b"", payload))
    finally:
        consumer.close()
    events.sort(key=lambda e: str(e.get("occurred_at", "")), reverse=True)
    return events[:limit]


def _event(value: bytes, payload: bool) -> dict[str, Any]:
    try:
        event = dict(orjson.loads(value))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return {"reason": "not JSON", "raw": value[:200].decode(errors="replace")}
    original = event.pop("original_value_b64", "") or ""
    event.pop("original_key_b64", None)
    if payload:
        event["original"] = base64.b64decode(original).decode(errors="replace")
    return event


def dead_letter_lines(events: list[dict[str, Any]]) -> list[str]:
    """A table of dead letters, newest first."""
    if not events:
        return ["no dead letters"]
    return table(
        [[when(e.get("occurred_at")), e.get("service", "?"), e.get("error_type", "?"),
          f"{e.get('source_topic')}[{e.get('source_partition')}]@{e.get('source_offset')}",
          e.get("campaign_id") or "-", str(e.get("reason", ""))[:120]] for e in events],
        ["at", "service", "error", "source", "campaign", "reason"],
    )
