"""Consumer lag of the pipeline's groups, correct on Apache Kafka and on tansu (R23).

Contract: `measure(settings)` returns, for each consumer group of the pipeline
(planner, sender, reconciler), its state, member count and, per topic and
partition it has committed on (or never committed on but holding messages, which
it will read from the earliest: `uncommitted`), the committed offset, the high watermark, the
offset lag and the time lag in seconds (now minus the timestamp of the first
message not yet consumed; 0 when caught up). The high watermark is the one a
fetch reports (`get_watermark_offsets(cached=True)` after reading from the
committed offset), not ListOffsets LATEST, which tansu answers wrongly when the
last batch holds several records. tansu also answers DescribeGroups with no
members, even for a stable group: a stable group with no member is reported
with `members=None` (unknown), never as 0, and its members gauge is not set.
`export(lags)` sets the kafka-lag-exporter
style gauges `kafka_consumergroup_group_lag`, `_group_lag_seconds`,
`_group_max_lag`, `_group_max_lag_seconds` and KMinion's
`kminion_kafka_consumer_group_members` / `_info{state}`, and
`mailer_consumer_group_stalled` (1 while a `ProgressWatch` flags the group).

A group is stalled when messages wait for it and nothing consumes them.
`measure` says so from one reading (`stall_reason`): no member holds its
partitions (state empty or dead) or it is rebalancing right now. A member
loop that keeps rejoining, or members that hold partitions and read nothing,
show only over time: `ProgressWatch`, kept by the reconciler's exporter, flags
a group whose committed offsets have not moved for `STALL_SECONDS` while
messages wait, and `export` sets the gauge from it.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import Gauge

from services.pipeline.kafka_clients import client_config
from services.pipeline.kafka_problems import BrokerReporter
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY

SERVICES = ("planner", "sender", "reconciler")

LAG = Gauge("kafka_consumergroup_group_lag", "Offset lag of a group on a partition.",
            ["group", "topic", "partition"])
LAG_SECONDS = Gauge("kafka_consumergroup_group_lag_seconds",
                    "Age of the oldest message a group has not consumed on a partition.",
                    ["group", "topic", "partition"])
MAX_LAG = Gauge("kafka_consumergroup_group_max_lag", "Largest offset lag of a group.", ["group"])
MAX_LAG_SECONDS = Gauge("kafka_consumergroup_group_max_lag_seconds",
                        "Largest time lag of a group.", ["group"])
MEMBERS = Gauge("kminion_kafka_consumer_group_members", "Members of a consumer group.", ["group_id"])
INFO = Gauge("kminion_kafka_consumer_group_info", "A consumer group's state (1 for the current one).",
             ["group_id", "state"])
STALLED = Gauge("mailer_consumer_group_stalled",
                "1 while a group has messages waiting and nothing consumes them.", ["group"])

#: Messages waiting and committed offsets still for this long: the group is stalled (seconds).
STALL_SECONDS = 60.0


@dataclass(frozen=True)
class PartitionLag:
    """One partition of one group."""

    topic: str
    partition: int
    committed: int
    high_watermark: int
    lag: int
    lag_seconds: float
    uncommitted: bool = False  # the group never committed here: `committed` is the earliest offset


@dataclass
class GroupLag:
    """One consumer group: its state, members and partitions."""

    group: str
    state: str
    members: int | None  # None: the broker did not say (tansu lists no members)
    partitions: list[PartitionLag] = field(default_factory=list)
    stalled: str | None = None  # why nothing consumes what waits (`stall_reason`); None: moving


def stall_reason(group: GroupLag) -> str | None:
    """From one reading: why nothing consumes what waits for `group`, or None."""
    waiting = sum(p.lag for p in group.partitions)
    if waiting == 0:
        return None
    if group.state in ("empty", "dead"):
        return f"{waiting} message(s) waiting and no member in the group: is the service running?"
    if group.state in ("preparingrebalance", "completingrebalance"):
        return f"{waiting} message(s) waiting while the group rebalances ({group.state})"
    return None


class ProgressWatch:
    """When each group's committed offsets last moved, across readings.

    Contract: `observe(groups)` returns the groups that had messages waiting in every reading
    of the last `stall_seconds` while their committed offsets did not move, and sets their
    `stalled` text; a group that moved, or has nothing waiting, starts counting again.
    """

    def __init__(self, stall_seconds: float = STALL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self.clock = clock
        self._since: dict[str, tuple[int, float]] = {}  # group -> (committed sum, since when)

    def observe(self, groups: list[GroupLag]) -> set[str]:
        now = self.clock()
        stalled = set()
        for g in groups:
            waiting = sum(p.lag for p in g.partitions)
            position = sum(p.committed for p in g.partitions)
            seen = self._since.get(g.group)
            if waiting == 0 or seen is None or seen[0] != position:
                self._since[g.group] = (position, now)
                continue
            idle = now - seen[1]
            if idle >= self.stall_seconds:
                stalled.add(g.group)
                why = g.stalled or "its members hold no partition, or read nothing"
                g.stalled = (f"{waiting} message(s) waiting and nothing consumed for {idle:.0f} s "
                             f"(group {g.state}): {why}")
        return stalled


@functools.cache
def _reporter(settings: Settings) -> BrokerReporter:
    """One reporter per process and settings: a broker outage is said once, not per measurement."""
    return BrokerReporter(settings)


def measure(settings: Settings, timeout: float = 10.0) -> list[GroupLag]:
    """The lag of every consumer group of the pipeline."""
    admin = AdminClient(client_config(settings, reporter=_reporter(settings)))
    groups = [settings.app_id(service) for service in SERVICES]
    result = []
    for group, future in admin.describe_consumer_groups(groups, request_timeout=timeout).items():
        try:
            description = future.result()
            state = str(description.state).rsplit(".", 1)[-1].lower()
            members: int | None = len(description.members)
            if state == "stable" and not description.members:
                members = None  # impossible on Kafka: a stable group has a member
        except Exception:
            state, members = "unknown", 0
        result.append(GroupLag(group, state, members))
    committed = {settings.app_id(service): _committed(settings, service, timeout) for service in SERVICES}
    for lag in result:
        lag.partitions = _partition_lags(settings, committed.get(lag.group, []), timeout)
        lag.stalled = stall_reason(lag)
    return result


def _committed(settings: Settings, service: str, timeout: float) -> list[TopicPartition]:
    """The offsets `service`'s group committed on the partitions of the topics it reads; a
    partition it never committed on has a negative offset (it will read from the earliest).

    Asked through a consumer in that group (OffsetFetch from its coordinator, found again
    when it moves), which never joins it: the AdminClient's list_consumer_group_offsets
    crashes librdkafka 2.16 (SIGSEGV in rd_kafka_cgrp_op) when the answer is
    NOT_COORDINATOR, as it is just after the coordinator's broker died (issue 13, the
    three-broker test; confluent-kafka-javascript#374 shows the same stack).
    """
    topics = [spec.name(settings) for spec in REGISTRY.values() if service in spec.consumers]
    consumer = _group_reader(settings, service)
    try:
        metadata = consumer.list_topics(timeout=timeout).topics
        wanted = [TopicPartition(topic, partition) for topic in topics if topic in metadata
                  for partition in sorted(metadata[topic].partitions)]
        if not wanted:
            return []
        return list(consumer.committed(wanted, timeout=timeout))
    except Exception:  # the broker did not answer in time: no partitions this round
        return []


@functools.cache
def _group_reader(settings: Settings, service: str) -> Consumer:
    """One consumer per group and process, kept for the process's life: the exporter asks every
    15 s, and three new librdkafka clients each time are threads and memory for nothing."""
    return Consumer({
        **client_config(settings, reporter=_reporter(settings)),
        "group.id": settings.app_id(service), "enable.auto.commit": False,
    })


def _partition_lags(
    settings: Settings, committed: list[TopicPartition], timeout: float
) -> list[PartitionLag]:
    """Read one message at each committed offset: its age, and the fetch's high watermark.

    A partition the group never committed on waits from its earliest offset (the services
    reset to the earliest): it is reported, marked `uncommitted`, when messages are in it.
    """
    if not committed:
        return []
    consumer = Consumer({
        **client_config(settings, reporter=_reporter(settings)),
        "group.id": f"mailer-lag-{uuid.uuid4().hex}", "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 20,  # an empty partition answers EOF at once, not after 500 ms
    })
    try:
        consumer.assign([TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0
                                        else OFFSET_BEGINNING) for tp in committed])
        first: dict[tuple[str, int], float | None] = {}
        start: dict[tuple[str, int], int] = {}  # offset of the first message read
        deadline = time.monotonic() + timeout
        while len(first) < len(committed) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            key = (str(msg.topic()), int(msg.partition() or 0))
            if key in first:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    first[key] = None  # caught up
                continue
            first[key] = msg.timestamp()[1] / 1000.0
            start[key] = int(msg.offset() or 0)
        now = time.time()
        lags = []
        for tp in committed:
            partition = TopicPartition(tp.topic, tp.partition)
            _, high = consumer.get_watermark_offsets(partition, cached=True)
            position = tp.offset
            if position < 0:  # never committed: it waits from the earliest message (the first
                # one read from the beginning); nothing there, or no answer: not reported
                if (tp.topic, tp.partition) not in start:
                    continue
                position = start[(tp.topic, tp.partition)]
            stamp = first.get((tp.topic, tp.partition))
            lags.append(PartitionLag(
                tp.topic, tp.partition, position, max(high, position), max(0, high - position),
                0.0 if stamp is None else max(0.0, now - stamp), uncommitted=tp.offset < 0,
            ))
        return lags
    finally:
        consumer.close()


_exported_state: dict[str, str] = {}  # group -> the state its info series carries


def export(groups: list[GroupLag], stalled: Collection[str] = ()) -> None:
    """Set the lag gauges from a measurement, and the stall gauge from `stalled` (the groups a
    `ProgressWatch` flagged); a group's info series carries its current state only."""
    for g in groups:
        if g.members is not None:
            MEMBERS.labels(g.group).set(g.members)
        previous = _exported_state.get(g.group)
        if previous is not None and previous != g.state:
            INFO.remove(g.group, previous)
        _exported_state[g.group] = g.state
        INFO.labels(g.group, g.state).set(1)
        for p in g.partitions:
            LAG.labels(g.group, p.topic, str(p.partition)).set(p.lag)
            LAG_SECONDS.labels(g.group, p.topic, str(p.partition)).set(p.lag_seconds)
        MAX_LAG.labels(g.group).set(max((p.lag for p in g.partitions), default=0))
        MAX_LAG_SECONDS.labels(g.group).set(max((p.lag_seconds for p in g.partitions), default=0.0))
        STALLED.labels(g.group).set(1 if g.group in stalled else 0)


def lag_lines(groups: list[GroupLag]) -> list[str]:
    """The measurement for a terminal: a line per group, then one per partition."""
    lines = []
    for group in groups:
        members = "?" if group.members is None else group.members
        lines.append(f"{group.group}  state={group.state}  members={members}")
        if group.stalled:
            lines.append(f"  STALLED: {group.stalled}")
        lines += [f"  {p.topic}[{p.partition}]  committed={'-' if p.uncommitted else p.committed}"
                  f"  high={p.high_watermark}"
                  f"  lag={p.lag}  lag_seconds={p.lag_seconds:.1f}" for p in group.partitions]
    return lines or ["no consumer group of the pipeline found"]
