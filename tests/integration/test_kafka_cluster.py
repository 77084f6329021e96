"""A three-broker Apache Kafka cluster that loses brokers mid-campaign (issue 13, R-faults).

3 KRaft nodes on loopback, every topic with replication factor 3 and
min.insync.replicas=2. A 5,000-recipient campaign runs on 2 senders; at about
30% delivered the broker leading most send-command partitions is SIGKILLed and
restarted, at about 60% a different broker is SIGKILLed and left down. Every
recipient must reach the SMTP server exactly once and the campaign complete.
The longest pause in deliveries after each loss is printed (docs/GUARANTEES.md).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from services.pipeline.kafka_local import KafkaCluster, start_kafka
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.integration.test_delivery_guarantees import SQL, start_campaign, states, view, wait_until
from tests.support.processes import run_services
from tests.support.smtp_server import SmtpServer

pytestmark = [pytest.mark.integration, pytest.mark.fault]

RECIPIENTS = 5000


def leaders(cluster: KafkaCluster, topic: str) -> Counter[int]:
    """How many of `topic`'s partitions each live node leads."""
    admin = AdminClient({"bootstrap.servers": ",".join(
        f"127.0.0.1:{n.port}" for n in cluster.nodes if n.alive)})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
    return Counter(p.leader for p in partitions if p.leader >= 0)


def replication(cluster: KafkaCluster, topic: str) -> tuple[set[int], str]:
    """The replica counts of `topic`'s partitions and its min.insync.replicas."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    deadline = time.monotonic() + 15
    while True:  # the broker asked may learn of a topic created a moment ago a little later
        try:
            partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
            configs = admin.describe_configs([resource])[resource].result()
            if partitions:
                break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic} has no partitions")
        time.sleep(0.5)
    return {len(p.replicas) for p in partitions}, configs["min.insync.replicas"].value


def longest_gap(stamps: list[float], since: float, until: float) -> float:
    """The longest time without a delivery between `since` and the first delivery after
    `until` (wall seconds)."""
    window = [since, *sorted(t for t in stamps if since <= t <= until)]
    later = [t for t in stamps if t > until]
    if later:
        window.append(min(later))
    return max(b - a for a, b in itertools.pairwise(window)) if len(window) > 1 else 0.0


@pytest.mark.timeout(600)
def test_three_brokers_lose_the_leader_then_another_and_nobody_is_mailed_twice(
    settings: Settings, smtp_server: SmtpServer, sql: SQL, tmp_path: Path,
) -> None:
    cluster = start_kafka(tmp_path / "kafka", nodes=3)
    settings = replace(settings, kafka_bootstrap_servers=cluster.bootstrap_servers,
                       topic_replication_factor=3, topic_min_insync_replicas=2)
    smtp_server.handler.data_delay = 0.01
    send_commands = topic_name(Topic.SEND_COMMANDS, settings)
    losses: list[tuple[str, int, float, int]] = []  # (what, node, wall time of the kill, delivered)
    try:
        with run_services(settings, tmp_path / "logs") as services:
            for name in ("planner", "reconciler", "sender", "sender"):
                services.start(name)
            assert replication(cluster, send_commands) == ({3}, "2")
            start_campaign(settings, "cluster", RECIPIENTS, confirmed=True)

            wait_until("30% delivered", lambda: len(smtp_server.messages()) >= RECIPIENTS * 3 // 10,
                       services, timeout=240)
            first = leaders(cluster, send_commands).most_common(1)[0][0]
            cluster.kill(first)
            losses.append(("leader of most send-command partitions, restarted", first, time.time(),
                           len(smtp_server.messages())))
            time.sleep(5)
            cluster.restart(first)

            wait_until("60% delivered", lambda: len(smtp_server.messages()) >= RECIPIENTS * 6 // 10,
                       services, timeout=240)
            second = next(node for node, _ in leaders(cluster, send_commands).most_common()
                          if node != first)
            cluster.kill(second)
            losses.append(("another broker, left down", second, time.time(),
                           len(smtp_server.messages())))

            wait_until("completion", lambda: view(settings, "cluster").get("status") == "completed",
                       services, timeout=360)
    finally:
        cluster.stop()

    delivered = smtp_server.delivered()
    assert len(delivered) == RECIPIENTS, f"{RECIPIENTS - len(delivered)} recipients never mailed"
    assert set(delivered.values()) == {1}, "a recipient was mailed twice"
    assert states(sql, "cluster") == {"sent": RECIPIENTS}

    stamps = [m.at for m in smtp_server.messages()]
    print(f"\n3 brokers, RF 3, min.insync.replicas 2, {RECIPIENTS} recipients, 2 senders: "
          f"{len(delivered)} delivered once, 0 twice, in {max(stamps) - min(stamps):.1f}s")
    ends = [later_at for _, _, later_at, _ in losses[1:]] + [losses[-1][2] + 60]
    for (what, node, at, count), until in zip(losses, ends, strict=True):
        stall = longest_gap(stamps, at, until)  # up to the next loss
        print(f"  SIGKILL node {node} ({what}) at {count} delivered: deliveries stalled {stall:.1f}s")
