"""Planner throughput: send commands per second, against a raw confluent-kafka producer.

Contract: `run(bench, args)` measures one figure on `bench`'s broker and a
fresh Postgres database of its own. It publishes a confirmed campaign of
`args.planner_recipients` demo recipients (start + chunks of
MAILER_MAX_CHUNK_RECIPIENTS) *before* the planner starts, so neither the
publish nor the planner's start-up and consumer-group join is measured; then
it starts the real planner (`mailer planner`), waits (progress every few
seconds, at most `args.timeout` s) until it has committed every planned send
in Postgres (it commits a chunk only after the broker acknowledged its
commands), stops it and reads the send-commands topic. The planner's rate is
the commands over the span of their timestamps (first to last produce). The
raw baseline produces exactly those messages (same keys and values) with a
plain confluent-kafka `Producer` configured like the pipeline's
`AsyncProducer`, to a fresh topic with the send-commands topic's partitions
and configs; its rate is the commands over the wall time from the first
produce to a complete flush, the median of RAW_REPEATS runs (the first
run's topic is read back to check every message arrived). Returns one
`Figure` (target: the planner reaches half the raw rate); its note carries
the planner's peak RSS and both spans. Raises `BenchError` when the planner
dies, a command is missing after the timeout, or a raw delivery fails.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import NewTopic

from benchmarks.common import BenchError, BenchRun, Figure, TopicSpan, read_span, say, timed
from services.pipeline.demo import demo_campaign, demo_recipients
from services.pipeline.kafka_admin import admin_client
from services.pipeline.producer import producer_config
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, spec, topic_name

#: The least acceptable planner rate over the raw producer's.
TARGET = 0.5
#: Raw producer runs; the figure's baseline is their median.
RAW_REPEATS = 3
#: Seconds between progress lines while the planner works.
PROGRESS_EVERY = 5.0


@dataclass(frozen=True)
class PlannerRun:
    """What the planner produced: its send commands as (key, value), their span, its peak RSS."""

    messages: list[tuple[bytes, bytes]]
    span: TopicSpan
    peak_rss_mib: float


@dataclass(frozen=True)
class RawRun:
    """The raw producer's median wall time (first produce to flush) and one topic's timestamp span."""

    seconds: float
    span: TopicSpan

    @property
    def rate(self) -> float:
        """Messages per second of wall time."""
        return self.span.count / max(self.seconds, 1e-3)


def run(bench: BenchRun, args: argparse.Namespace) -> list[Figure]:
    """The planner's send commands per second beside the raw producer's (see the module docstring)."""
    recipients, timeout = int(args.planner_recipients), float(args.timeout)
    settings = bench.settings("planner")
    planned = measure_planner(bench, settings, recipients, timeout)
    say(f"planner: {planned.span.count:,} send commands in {planned.span.seconds:.2f} s "
        f"= {planned.span.rate:,.0f}/s; peak RSS {planned.peak_rss_mib:.1f} MiB")
    raw = measure_raw(bench, settings, planned.messages, timeout)
    say(f"raw producer: {len(planned.messages):,} messages in {raw.seconds:.2f} s = {raw.rate:,.0f}/s")
    note = (f"planner {planned.span.seconds:.2f} s (first to last produce timestamp), peak RSS "
            f"{planned.peak_rss_mib:.1f} MiB; raw {raw.seconds:.2f} s (first produce to flush, median "
            f"of {RAW_REPEATS}; {raw.span.seconds:.2f} s of timestamps); "
            f"{settings.send_commands_partitions} partitions, chunks of {settings.max_chunk_recipients}")
    return [Figure(f"planner: send commands/s ({recipients:,} recipients)", planned.span.rate, "msg/s",
                   "raw confluent-kafka producer", raw.rate, target=TARGET, note=note)]


# --- the planner -------------------------------------------------------------------------


def measure_planner(bench: BenchRun, settings: Settings, recipients: int, timeout: float) -> PlannerRun:
    """Publish the campaign, run the planner until every send command is out, stop it, read them."""
    campaign_id = f"bench-planner-{secrets.token_hex(4)}"
    publish(settings, campaign_id, recipients)
    topic = topic_name(Topic.SEND_COMMANDS, settings)
    service = bench.start_service("planner", "planner", settings)
    say(f"planner started (pid {service.process.pid}, log {service.log_path})")
    wait_for_planned(settings.database_url, campaign_id, recipients, timeout=timeout, check=service.check)
    peak = bench.stop_service(service)
    values: list[bytes] = []
    span = read_span(settings, topic, recipients, timeout=timeout, on_message=values.append)
    return PlannerRun(keyed(values), span, peak)


def wait_for_planned(database_url: str, campaign_id: str, expect: int, *, timeout: float,
                     check: Callable[[], None]) -> None:
    """Wait until the planner has committed `expect` planned sends of the campaign: it commits a
    chunk only once the broker acknowledged its commands, so they are all on the topic then.

    (Reading the topic meanwhile would take CPU from the planner on a small machine, and tansu
    answers ListOffsets LATEST wrongly, so end offsets cannot tell.) Progress every
    PROGRESS_EVERY s; `BenchError` after `timeout` s.
    """
    started = time.monotonic()
    next_line = started + PROGRESS_EVERY
    with psycopg.connect(database_url, autocommit=True) as conn:
        while (count := planned_count(conn, campaign_id)) < expect:
            check()
            now = time.monotonic()
            if now - started > timeout:
                raise BenchError(f"campaign {campaign_id}: {count} of {expect} sends planned "
                                 f"after {timeout:.0f} s")
            if now >= next_line:
                say(f"  {count:,} of {expect:,} sends planned after {now - started:.0f} s")
                next_line = now + PROGRESS_EVERY
            time.sleep(0.5)


def planned_count(conn: psycopg.Connection[Any], campaign_id: str) -> int:
    """How many sends of the campaign the planner has committed."""
    row = conn.execute("SELECT count(*) FROM planned_sends WHERE campaign_id = %s", (campaign_id,)).fetchone()
    return int(row[0]) if row else 0


def publish(settings: Settings, campaign_id: str, recipients: int) -> None:
    """Publish a confirmed demo campaign of `recipients` recipients and wait for the broker."""
    chunk = settings.max_chunk_recipients
    say(f"publishing campaign {campaign_id}: {recipients:,} recipients in chunks of {chunk}")
    with timed() as elapsed:
        asyncio.run(publish_campaign(settings, demo_campaign(campaign_id), demo_recipients(recipients),
                                     chunk))
    say(f"published in {elapsed():.1f} s")


def keyed(values: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(key, value) of each send command: the planner keys a command by its send id."""
    return [(orjson.loads(value)["send_id"].encode(), value) for value in values]


# --- the raw baseline ------------------------------------------------------------------------


def raw_config(settings: Settings) -> dict[str, Any]:
    """The producer configuration of `services.pipeline.producer.AsyncProducer`."""
    return producer_config(settings, settings.app_id("bench-raw"))


def create_raw_topic(settings: Settings, tag: str) -> str:
    """A fresh topic with the send-commands topic's partitions and configs; its name."""
    send = spec(Topic.SEND_COMMANDS)
    name = f"{settings.topic_prefix}bench.raw-send-commands-{tag}"
    topic = NewTopic(name, num_partitions=send.partitions_for(settings),
                     replication_factor=settings.topic_replication_factor,
                     config=send.configs_for(settings))
    admin = admin_client(settings)  # kept alive: the future fails once the client is destroyed
    try:
        admin.create_topics([topic], request_timeout=30)[name].result()
    except KafkaException as exc:
        raise BenchError(f"cannot create {name}: {exc}") from None
    return name


def measure_raw(bench: BenchRun, settings: Settings, messages: list[tuple[bytes, bytes]],
                timeout: float) -> RawRun:
    """The median of RAW_REPEATS plain-producer runs of `messages`, each to a fresh topic (one
    short run is easily disturbed on a shared machine); the first topic is read back to check."""
    warm_up = create_raw_topic(settings, "warm-up")
    topics = [create_raw_topic(settings, f"run{i + 1}") for i in range(RAW_REPEATS)]
    runs = [produce_all(settings, topic, messages, warm_up) for topic in topics]
    say(f"raw producer runs: {', '.join(f'{run:.3f} s' for run in runs)}")
    return RawRun(statistics.median(runs),
                  read_span(settings, topics[0], len(messages), timeout=timeout))


def produce_all(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]], warm_up: str) -> float:
    """Seconds a plain producer takes from the first produce of `messages` to a complete flush.

    Before the clock starts it delivers one message to `warm_up`, so the producer is connected
    and has its idempotent producer id (else the first produce may wait ~0.5 s for it), and it
    learns `topic`'s leaders: the planner's long-lived producer has done both long before.
    """
    producer = Producer(raw_config(settings))
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    produce(producer, warm_up, b"warm-up", b"{}", on_delivery)
    producer.flush(30)
    producer.list_topics(topic, timeout=10)
    with timed() as elapsed:
        for key, value in messages:
            produce(producer, topic, key, value, on_delivery)
        remaining = producer.flush(120)
        seconds = elapsed()
    if remaining or failures:
        raise BenchError(f"raw producer: {remaining} undelivered, {len(failures)} failed "
                         f"({failures[:1]})")
    return seconds


def produce(producer: Producer, topic: str, key: bytes, value: bytes,
            on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
    """Queue one message, serving delivery reports while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)
