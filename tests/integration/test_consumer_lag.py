"""Consumer lag from the fetch high watermark: right on tansu, where ListOffsets LATEST is not."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from services.pipeline.cli import main
from services.pipeline.consumer_lag import LAG, MAX_LAG_SECONDS, export, measure
from services.pipeline.kafka_admin import ensure_topics
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name

pytestmark = pytest.mark.integration


def test_lag_counts_what_a_group_has_not_consumed(settings: Settings) -> None:
    ensure_topics(settings)
    topic = topic_name(Topic.CAMPAIGN_COMMANDS, settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 50})
    for i in range(10):  # one batch of several records: ListOffsets LATEST is wrong here on tansu
        producer.produce(topic, key=b"k", value=f"m{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    time.sleep(1.5)
    group = settings.app_id("planner")
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    read = 0
    while read < 3:
        msg = consumer.poll(1.0)
        if msg is not None and not msg.error():
            read += 1
    consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    consumer.close()

    lags = {g.group: g for g in measure(settings)}
    planner = lags[group]
    [partition] = planner.partitions
    assert (partition.topic, partition.partition) == (topic, 0)
    assert (partition.committed, partition.high_watermark, partition.lag) == (3, 10, 7)
    assert 1.0 <= partition.lag_seconds < 60  # the 4th message waits since it was produced
    assert lags[settings.app_id("sender")].partitions == []
    export(list(lags.values()))
    assert LAG.labels(group, topic, "0")._value.get() == 7
    assert MAX_LAG_SECONDS.labels(group)._value.get() >= 1.0


def test_lag_command_prints_the_groups(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ensure_topics(settings)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert main(["lag"]) == 0
    out = capsys.readouterr().out
    assert all(f"{settings.app_id(s)}  state=" in out for s in ("planner", "sender", "reconciler"))
