"""Sender throughput: emails per second into smtp-sink, one and two processes, against raw aiosmtplib.

Contract: `run(bench, args)` measures, for P in (1, 2) sender processes, each in
a fresh database, topics and Redis keys (`bench.settings("senderP")`, every
sending limit lifted, the limiter's epoch set as `mailer migrate` would):

1. the sender: P real `mailer sender` processes are started against empty
   send-commands; warm-up rounds of demo-campaign commands are produced until
   every process has claimed some in one round (the group has settled, the
   SMTP, Postgres and Redis connections are open); then `args.sender_emails`
   commands of the demo template (distinct recipients) are produced at once
   with a raw confluent producer. The rate is the measured outcomes' count
   over the span of their `occurred_at` stamps (first outcome to last). Every
   outcome should be `outcome.sent`; other kinds and repeated send ids are
   reported in the figure's note. The senders are stopped; their peak RSS goes
   in the note.
2. the raw baseline: P spawned processes, each with `sender_concurrency`
   persistent aiosmtplib connections (EHLO done before the clock starts),
   send the same emails (rendered and built as the sender builds them, to
   bytes, before timing) with `SMTP.sendmail`; wall clock from the common
   start (a barrier) to the last process's end.

Figures: sender emails/s against the raw at the same concurrency, for 1 and 2
processes (target 0.8 each), and the 2-process rate against the 1-process
rate (target 1.6). Raises `BenchError` when a sender dies or an outcome is
missing after `args.timeout`. Redis keys of the run are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiosmtplib
import orjson
import psycopg
import redis.asyncio as aioredis
from confluent_kafka import Producer

from benchmarks.common import (
    BenchError,
    BenchRun,
    Figure,
    Service,
    produce_messages,
    read_span,
    say,
)
from services.pipeline.contract import Message
from services.pipeline.demo import demo_campaign
from services.pipeline.embedded import stop_processes
from services.pipeline.ids import send_id
from services.pipeline.kafka_clients import client_config
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.planner.plan_chunk import send_command
from services.sender.message import build_message
from services.sender.render import render_command

PROCESS_COUNTS = (1, 2)
TARGET_VS_RAW = 0.8
TARGET_SCALING = 1.6
#: Warm-up emails per sender process per round.
WARMUP_PER_PROCESS = 64
#: Longest wait for the sender group to settle (s).
WARMUP_TIMEOUT = 180.0
SINK_NOTE = ("smtp-sink is not the bottleneck: it takes >10k msg/s here "
             "(smtp-source -m 5000 -s 16)")


# --- the emails ---------------------------------------------------------------------


def recipient(index: int) -> dict[str, Any]:
    """Recipient number `index` of a benchmark campaign (distinct addresses)."""
    return {"email": f"bench-{index:07d}@example.com", "name": f"Bench {index}",
            "variables": {"n": index}}


def commands(campaign_id: str, start: int, stop: int) -> Iterator[Message]:
    """The demo campaign's `send.email` commands for recipients `start` .. `stop - 1`."""
    definition = demo_campaign(campaign_id)
    for index in range(start, stop):
        to = recipient(index)
        yield send_command(definition, to, send_id(campaign_id, to["email"]))


def email_bytes(command: Message, settings: Settings) -> tuple[str, str, bytes]:
    """(envelope sender, recipient, message bytes) the sender would send for `command`."""
    message = build_message(command, render_command(command), settings)
    return command["from"]["email"], command["recipient"]["email"], message.as_bytes()


def produce(settings: Settings, topic: str, messages: Iterable[Message]) -> int:
    """Produce `messages` keyed by send id and wait for the broker; how many."""
    producer = Producer({**client_config(settings), "linger.ms": 20, "acks": "all",
                         "queue.buffering.max.messages": 1_000_000})
    count = produce_messages(producer, topic, messages)
    if (left := producer.flush(60)) > 0:
        raise BenchError(f"{left} send commands not delivered to {topic}")
    return count


# --- reading the outcomes --------------------------------------------------------------


@dataclass
class Outcomes:
    """The measured campaign's outcomes as they are read: kinds, send ids, time span."""

    campaign_id: str
    kinds: Counter[str] = field(default_factory=Counter)
    send_ids: set[str] = field(default_factory=set)
    repeated: int = 0
    first: float = float("inf")
    last: float = 0.0

    def add(self, value: bytes) -> None:
        """One outcome read from the topic (others' campaigns are ignored)."""
        outcome = orjson.loads(value)
        if outcome.get("campaign_id") != self.campaign_id:
            return
        if outcome["send_id"] in self.send_ids:
            self.repeated += 1
            return
        self.send_ids.add(outcome["send_id"])
        self.kinds[outcome["kind"]] += 1
        at = datetime.fromisoformat(outcome["occurred_at"]).timestamp()
        self.first, self.last = min(self.first, at), max(self.last, at)

    @property
    def count(self) -> int:
        """Distinct sends with an outcome."""
        return len(self.send_ids)

    @property
    def seconds(self) -> float:
        """From the first outcome to the last (s)."""
        return max(self.last - self.first, 1e-3)

    @property
    def rate(self) -> float:
        """Outcomes per second over the span."""
        return self.count / self.seconds

    def anomalies(self) -> str:
        """Kinds other than sent, and repeated outcomes, as text ('' when none)."""
        parts = [f"{n} {kind}" for kind, n in sorted(self.kinds.items()) if kind != "outcome.sent"]
        if self.repeated:
            parts.append(f"{self.repeated} repeated")
        return ", ".join(parts)


# --- the sender ------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderResult:
    """One sender measurement; `cpu` is the senders' CPU seconds over `wall` seconds of it."""

    outcomes: Outcomes
    peak_rss: list[float]
    warmup: int
    cpu: float
    wall: float

    @property
    def cpu_ms_per_email(self) -> float:
        """Sender CPU (all processes) per measured email, in ms."""
        return 1000 * self.cpu / max(self.outcomes.count, 1)

    @property
    def cores(self) -> float:
        """Cores the senders kept busy, on average, while measured."""
        return self.cpu / max(self.wall, 1e-3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def services_cpu(services: list[Service]) -> float:
    """CPU seconds of every service process so far."""
    return sum(cpu_seconds(s.process.pid) for s in services)


def finished_claims(settings: Settings, campaign_id: str) -> tuple[int, int]:
    """(finished claims, distinct claiming processes) of one campaign."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT claimed_by) FROM send_claims"
            " WHERE campaign_id = %s AND finished_at IS NOT NULL", (campaign_id,)).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def check_all(services: list[Service]) -> Callable[[], None]:
    """A check that raises when any of `services` has exited."""
    def check() -> None:
        for service in services:
            service.check()
    return check


def warm_round(bench: BenchRun, settings: Settings, check: Callable[[], None],
               campaign_id: str, size: int) -> int:
    """Produce one warm-up round and wait until it is sent; how many processes claimed it."""
    produce(settings, topic_name(Topic.SEND_COMMANDS, settings), commands(campaign_id, 0, size))
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while (done := finished_claims(settings, campaign_id))[0] < size:
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up {campaign_id}: {done[0]} of {size} sent after "
                             f"{WARMUP_TIMEOUT:.0f}s")
        time.sleep(0.2)
    return done[1]


def warm_up(bench: BenchRun, settings: Settings, services: list[Service]) -> int:
    """Warm-up rounds until every process claimed part of one; how many emails they sent."""
    check, processes = check_all(services), len(services)
    size, produced = WARMUP_PER_PROCESS * processes, 0
    started = time.monotonic()
    for round_no in range(1, 1000):
        claimers = warm_round(bench, settings, check, f"bench-warmup-{round_no}", size)
        produced += size
        if claimers >= processes:
            say(f"  warm-up: {round_no} round(s), {produced} emails, "
                f"{time.monotonic() - started:.1f}s")
            break
        if time.monotonic() - started > WARMUP_TIMEOUT:
            raise BenchError(f"only {claimers} of {processes} senders took sends after "
                             f"{WARMUP_TIMEOUT:.0f}s of warm-up")
        time.sleep(0.5)
    return produced


def progress_printer(total: int) -> Callable[[int], None]:
    """A read_span progress callback that prints about every 5 s."""
    state = {"next": time.monotonic() + 5.0}

    def progress(count: int) -> None:
        if time.monotonic() >= state["next"]:
            say(f"  {count:,} outcomes read (of {total:,})")
            state["next"] = time.monotonic() + 5.0
    return progress


def read_outcomes(bench: BenchRun, settings: Settings, campaign_id: str, warm: int, emails: int,
                  services: list[Service], timeout: float) -> Outcomes:
    """Read the outcomes topic until every measured send has one.

    The topic holds `warm` warm-up outcomes, the measured ones, and any outcome a
    redelivered command repeated (a rebalance); each repeat read in place of a
    measured outcome makes the next read expect one more.
    """
    topic, expect = topic_name(Topic.SEND_OUTCOMES, settings), warm + emails
    while True:
        outcomes = Outcomes(campaign_id)
        read_span(settings, topic, expect, timeout=timeout, check=check_all(services),
                  on_message=outcomes.add, progress=progress_printer(expect))
        if outcomes.count >= emails:
            return outcomes
        expect += emails - outcomes.count


def measure_sender(bench: BenchRun, settings: Settings, processes: int, emails: int,
                   timeout: float) -> SenderResult:
    """Emails per second of `processes` sender processes (see the module docstring)."""
    services = [bench.start_service(f"sender{processes}-{i}", "sender", settings)
                for i in range(1, processes + 1)]
    try:
        warm = warm_up(bench, settings, services)
        campaign_id = f"bench-sender-{processes}"
        cpu, started = services_cpu(services), time.monotonic()
        produce(settings, topic_name(Topic.SEND_COMMANDS, settings),
                commands(campaign_id, 0, emails))
        outcomes = read_outcomes(bench, settings, campaign_id, warm, emails, services, timeout)
        cpu, wall = services_cpu(services) - cpu, time.monotonic() - started
    except BaseException:
        stop_processes([s.process for s in services], timeout=20.0)
        raise
    peaks = [bench.stop_service(s) for s in services]
    return SenderResult(outcomes, peaks, warm, cpu, wall)


# --- the raw baseline -------------------------------------------------------------------


@dataclass(frozen=True)
class RawShare:
    """One raw process's part: emails `start` .. `stop - 1` over `connections` connections."""

    host: str
    port: int
    campaign_id: str
    start: int
    stop: int
    connections: int


def raw_shares(settings: Settings, campaign_id: str, emails: int, processes: int) -> list[RawShare]:
    """`emails` split evenly over `processes`, each with `sender_concurrency` connections."""
    bounds = [emails * i // processes for i in range(processes + 1)]
    return [RawShare(settings.smtp_host, settings.smtp_port, campaign_id, bounds[i], bounds[i + 1],
                     settings.sender_concurrency) for i in range(processes)]


async def raw_send(share: RawShare, settings: Settings, ready: Any) -> tuple[float, float, int]:
    """Send the share's prebuilt emails on persistent connections: (start, end, sent)."""
    emails = [email_bytes(c, settings) for c in commands(share.campaign_id, share.start, share.stop)]
    clients = [aiosmtplib.SMTP(hostname=share.host, port=share.port, timeout=30.0, start_tls=False)
               for _ in range(share.connections)]
    for client in clients:
        await client.connect()
        await client.ehlo()
    await asyncio.to_thread(ready.wait)
    pending = iter(emails)
    sent = 0

    async def loop(client: aiosmtplib.SMTP) -> None:
        nonlocal sent
        for sender, to, data in pending:
            errors, _ = await client.sendmail(sender, [to], data)
            sent += not errors

    started = time.time()
    await asyncio.gather(*(loop(c) for c in clients))
    ended = time.time()
    for client in clients:
        await client.quit()
    return started, ended, sent


def raw_worker(share: RawShare, settings: Settings, ready: Any, results: Any) -> None:
    """A spawned raw process: its (start, end, sent) on `results`."""
    results.put(asyncio.run(raw_send(share, settings, ready)))


def measure_raw(settings: Settings, processes: int, emails: int, timeout: float) -> float:
    """Emails per second of raw aiosmtplib, `processes` spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(processes), ctx.Queue()
    shares = raw_shares(settings, f"bench-sender-{processes}", emails, processes)
    procs = [ctx.Process(target=raw_worker, args=(s, settings, ready, results)) for s in shares]
    for proc in procs:
        proc.start()
    try:
        spans = [collect(results, procs, timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    sent = sum(n for _, _, n in spans)
    if sent < emails:
        raise BenchError(f"raw aiosmtplib sent {sent} of {emails}")
    return sent / max(max(e for _, e, _ in spans) - min(s for s, _, _ in spans), 1e-3)


def collect(results: Any, procs: list[Any], timeout: float) -> tuple[float, float, int]:
    """The next raw process's result; `BenchError` when one died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result: tuple[float, float, int] = results.get(timeout=1.0)
            return result
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise BenchError("a raw aiosmtplib process failed") from None
            if time.monotonic() > deadline:
                raise BenchError(f"raw aiosmtplib did not finish in {timeout:.0f}s") from None


# --- the benchmark ----------------------------------------------------------------------


async def delete_keys(settings: Settings) -> int:
    """Delete this measurement's limiter keys from Redis; how many."""
    client = aioredis.Redis.from_url(settings.redis_url)
    deleted = 0
    try:
        async for key in client.scan_iter(match="{" + settings.redis_key_prefix + "}:*", count=5000):
            deleted += await client.unlink(key)
    finally:
        await client.aclose()
    return deleted


def sender_note(result: SenderResult, settings: Settings) -> str:
    """The note of one sender figure: setup, RSS and anything but `sent`."""
    rss = ", ".join(f"{p:.0f}" for p in result.peak_rss)
    note = (f"{result.outcomes.count:,} emails in {result.outcomes.seconds:.1f}s after "
            f"{result.warmup:,} warm-up; concurrency {settings.sender_concurrency}, "
            f"SMTP pool {settings.smtp_pool_size} per process; sender CPU "
            f"{result.cpu_ms_per_email:.2f} ms/email ({result.cores:.2f} cores); peak RSS {rss} MiB")
    if anomalies := result.outcomes.anomalies():
        note += f"; NOT SENT: {anomalies}"
    return note


def measure(bench: BenchRun, processes: int, emails: int, timeout: float) -> Figure:
    """The sender figure for `processes` processes against its raw baseline."""
    # as many SMTP connections as sends in flight, like the raw baseline
    settings = bench.settings(f"sender{processes}", smtp_pool_size=bench.base.sender_concurrency)
    try:
        say(f"sender, {processes} process(es), {emails:,} emails")
        result = measure_sender(bench, settings, processes, emails, timeout)
        say(f"  sender: {result.outcomes.rate:,.0f} emails/s, {result.cpu_ms_per_email:.2f} CPU ms/email "
            f"({result.cores:.2f} cores); outcomes {dict(result.outcomes.kinds)}")
        raw = measure_raw(settings, processes, emails, timeout)
        say(f"  raw aiosmtplib: {raw:,.0f} emails/s")
    finally:
        asyncio.run(delete_keys(settings))
    connections = f"{processes}x{settings.sender_concurrency}"
    return Figure(
        name=f"sender: emails/s, {processes} process{'es' if processes > 1 else ''}",
        value=result.outcomes.rate, unit="emails/s",
        baseline_name=f"raw aiosmtplib, {connections} connections", baseline=raw,
        target=TARGET_VS_RAW, note=sender_note(result, settings),
    )


def run(bench: BenchRun, args: argparse.Namespace) -> list[Figure]:
    """Sender throughput with 1 and 2 processes, and its scaling (see the module docstring)."""
    figures = [measure(bench, p, args.sender_emails, args.timeout) for p in PROCESS_COUNTS]
    one, two = figures
    figures.append(Figure(
        name="sender: 2 processes / 1 process", value=two.value, unit="emails/s",
        baseline_name="sender, 1 process", baseline=one.value, target=TARGET_SCALING,
        note=SINK_NOTE,
    ))
    return figures
