"""Consumer lag from the fetch high watermark: right on tansu, where ListOffsets LATEST is not,
and the same numbers Kafka's own kafka-consumer-groups.sh prints on Apache Kafka."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from services.pipeline.cli import main
from services.pipeline.consumer_lag import LAG, MAX_LAG_SECONDS, export, measure
from services.pipeline.kafka_admin import ensure_topics
from services.pipeline.kafka_local import CONSUMER_GROUP_COMMAND, kafka_tool
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.integration.test_delivery_guarantees import start_campaign, view, wait_until
from tests.support.processes import ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration


@pytest.mark.tansu_smoke
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


# --- against Kafka's own consumer-group command ------------------------------------

#: (group, topic, partition) -> (committed offset, end offset, lag)
LagTable = dict[tuple[str, str, int], tuple[int, int, int]]


def mailer_lag(services: ServiceRunner) -> LagTable:
    """What `mailer lag` prints, as a table."""
    done = subprocess.run([sys.executable, "-m", "services.pipeline.cli", "lag"], env=services.env(),
                          capture_output=True, text=True, timeout=60, check=True)
    table: LagTable = {}
    group = ""
    for line in done.stdout.splitlines():
        if not line.startswith(" "):
            group = line.split()[0]
        elif m := re.match(r"\s+(\S+)\[(\d+)\]\s+committed=(\d+)\s+high=(\d+)\s+lag=(\d+)", line):
            table[(group, m[1], int(m[2]))] = (int(m[3]), int(m[4]), int(m[5]))
    return table


def kafka_lag(settings: Settings, groups: list[str]) -> LagTable:
    """What Kafka's kafka-consumer-groups.sh --describe prints for `groups` (same jars as the
    broker), for the partitions with a committed offset."""
    args = ["--bootstrap-server", settings.kafka_bootstrap_servers, "--describe"]
    for group in groups:
        args += ["--group", group]
    table: LagTable = {}
    for line in kafka_tool(CONSUMER_GROUP_COMMAND, *args).splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0] in groups and parts[2].isdigit() and parts[3].isdigit():
            table[(parts[0], parts[1], int(parts[2]))] = (int(parts[3]), int(parts[4]), int(parts[5]))
    return table


def compare_lag(settings: Settings, services: ServiceRunner, when: str) -> LagTable:
    """Read `mailer lag`, Kafka's tool, `mailer lag` again until the two mailer readings agree
    (nothing moved in between); then Kafka's reading must be the same table."""
    groups = [settings.app_id(s) for s in ("planner", "sender", "reconciler")]
    deadline = time.monotonic() + 90
    while True:
        before = mailer_lag(services)
        theirs = kafka_lag(settings, groups)
        after = mailer_lag(services)
        if before == after or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert before == after, f"the lag never settled {when}"
    assert after == theirs, f"{when}: mailer lag {after} != kafka-consumer-groups {theirs}"
    return after


def test_lag_equals_kafkas_consumer_group_command_during_and_after_a_campaign(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer,
) -> None:
    for name in ("planner", "reconciler"):
        services.start(name)
    sender = services.start("sender")
    start_campaign(settings, "lag-a", 400)
    wait_until("campaign lag-a", lambda: view(settings, "lag-a").get("status") == "completed", services)
    sender.send_signal(signal.SIGTERM)  # its offsets are committed on every partition
    sender.wait(30)
    services.forget(sender)

    start_campaign(settings, "lag-b", 600)  # planned, but no sender runs
    send_commands = topic_name(Topic.SEND_COMMANDS, settings)
    sender_group = settings.app_id("sender")
    wait_until("600 send commands waiting", lambda: sum(
        lag for (group, topic, _), (_, _, lag) in mailer_lag(services).items()
        if group == sender_group and topic == send_commands) == 600, services)
    during = compare_lag(settings, services, "during the campaign")
    waiting = {key: row for key, row in during.items() if key[0] == sender_group and row[2] > 0}
    assert len(waiting) >= 4 and sum(row[2] for row in waiting.values()) == 600

    services.start("sender")
    wait_until("campaign lag-b", lambda: view(settings, "lag-b").get("status") == "completed", services)
    after = compare_lag(settings, services, "after the campaign")
    assert sum(row[2] for key, row in after.items() if key[0] == sender_group) == 0
    print(f"\nmailer lag == kafka-consumer-groups on {len(during)} partitions during "
          f"(600 waiting for the stopped sender on {len(waiting)}) and {len(after)} after")
