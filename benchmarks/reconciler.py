"""Reconciler benchmark: send outcomes applied to Postgres per second, against a raw COPY.

Contract: `run(bench, args)` measures, in its own database and topics
(`bench.settings("reconciler")`), how fast the real reconciler service
(`mailer reconciler`, a child process) applies `args.reconciler_outcomes` (N)
send outcomes, and returns one `Figure` beside the raw baseline measured in
the same run. Steps:

1. The state the outcomes refer to is made the way the pipeline makes it: a
   reconciler process projects one campaign of N recipients (a `campaign.start`
   and its `campaign.recipients` chunks, published with the CRM's own helpers)
   into campaigns/recipients, and is stopped once the projection is complete.
2. N valid outcomes of those recipients' sends (one in `FAILED_EVERY` a
   permanent `outcome.failed`, every other one of those a hard bounce, the rest
   `outcome.sent`), keyed by send id as the sender keys them, are produced to the
   send-outcomes topic while no reconciler runs.
3. A fresh reconciler process applies them. The figure spans the reconciler's
   batch transactions as Postgres stamped them (`send_log.recorded_at` is the
   transaction's start): the outcomes of every batch but the last two, over the
   seconds from the first batch's start to the second-to-last batch's start,
   i.e. whole batch cycles (consume, validate, transaction, outbox), start-up
   and the wait to fill the final, partial batch excluded. Its peak RSS goes in
   the note.
4. The baseline: one psycopg `COPY ... FROM STDIN` (`write_row`) transaction of
   exactly the rows the reconciler wrote for those outcomes (send_log,
   recipients and suppressions, read back) into empty `LIKE ... INCLUDING ALL`
   copies of those tables in the same database, timed from its start to its
   commit; N / those seconds.

Needs N larger than two reconciler batches (`MAILER_RECONCILER_BATCH_SIZE`,
default 500): raises `BenchError` otherwise, or when a service dies, a step
stalls, or `args.timeout` passes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage

from benchmarks.common import BenchError, BenchRun, Figure, Service, produce_messages, say, timed
from services.pipeline.contract import Message, envelope, validate
from services.pipeline.ids import message_id_header, send_id
from services.pipeline.kafka_clients import client_config
from services.pipeline.publish import campaign_messages, publish
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name

CAMPAIGN_ID = "bench-reconciler"
MANAGER_ID = "bench-manager"
#: One outcome in FAILED_EVERY is a permanent failure; every other one of those a hard bounce.
FAILED_EVERY = 50
#: The tables the reconciler writes per outcome, copied by the baseline (and which rows).
COPIED = {
    "send_log": "campaign_id = %(campaign)s",
    "recipients": "campaign_id = %(campaign)s",
    "suppressions": "reason = 'hard_bounce'",
}
POLL_SECONDS = 0.5
#: Longest wait without progress before a step is declared stuck (s).
STALL_SECONDS = 180.0


@dataclass(frozen=True)
class Applied:
    """The reconciler's batch transactions of one measurement: (start, outcomes) in order."""

    batches: list[tuple[datetime, int]]

    @property
    def outcomes(self) -> int:
        """Outcomes applied in all."""
        return sum(rows for _, rows in self.batches)

    @property
    def timed(self) -> int:
        """Outcomes of the batches inside the span: all but the last two."""
        return sum(rows for _, rows in self.batches[:-2])

    @property
    def seconds(self) -> float:
        """Seconds from the first batch's start to the second-to-last's (the last one's start
        would add the wait to fill the final batch, which is often partial)."""
        if len(self.batches) < 3:
            return 0.0
        return (self.batches[-2][0] - self.batches[0][0]).total_seconds()

    @property
    def rate(self) -> float:
        """Outcomes per second over the span: whole batch cycles."""
        if self.seconds <= 0:
            raise BenchError(f"{self.outcomes} outcomes went in {len(self.batches)} batch(es): too "
                             "few to time; give --reconciler-outcomes above two reconciler batches")
        return self.timed / self.seconds


# --- the messages ------------------------------------------------------------------------


def bench_recipients(n: int) -> list[dict[str, Any]]:
    """N distinct recipients, as a CRM list holds them."""
    return [{"email": f"reader{i:07d}@bench.example.com", "name": f"Reader {i}"} for i in range(n)]


def campaign_definition() -> dict[str, Any]:
    """The benchmark's campaign: started by its manager, confirmed (no confirmation wait)."""
    return {
        "campaign_id": CAMPAIGN_ID, "manager_id": MANAGER_ID, "actor_id": MANAGER_ID,
        "actor_role": "manager", "name": "reconciler benchmark", "confirmed": True,
        "from": {"email": "news@bench.example.com", "name": "Bench"},
        "template": {"subject": "Hello {{ name }}", "text": "Hello {{ name }}"},
    }


def outcome_message(campaign_id: str, account: str, email: str, index: int, domain: str) -> Message:
    """The sender's outcome of recipient `index`: sent, or now and then a permanent failure."""
    send = send_id(campaign_id, email)
    fields: dict[str, Any] = {
        "campaign_id": campaign_id, "send_id": send, "attempt": 1, "is_test": False,
        "account": account, "recipient_email": email, "smtp_code": 250,
        "smtp_reply": f"2.0.0 Ok: queued as {index:010X}", "error_class": None,
        "message_id_header": message_id_header(send, domain), "duration_ms": 12.5 + index % 40,
    }
    if index % FAILED_EVERY != FAILED_EVERY - 1:
        return envelope("outcome.sent", **fields)
    if (index // FAILED_EVERY) % 2 == 0:
        fields.update(smtp_code=550, smtp_reply=f"5.1.1 <{email}>: Recipient address rejected: "
                      "User unknown", reason="RCPT TO refused with 550 (hard bounce)", hard_bounce=True)
    else:
        fields.update(smtp_code=554, smtp_reply="5.7.1 Message rejected by policy",
                      reason="DATA refused with 554 (permanent)")
    fields["error_class"] = "permanent"
    return envelope("outcome.failed", **fields)


def outcome_messages(campaign_id: str, account: str, recipients: Sequence[dict[str, Any]],
                     domain: str) -> Iterator[Message]:
    """One valid outcome per recipient, in list order."""
    for index, recipient in enumerate(recipients):
        yield validate(outcome_message(campaign_id, account, recipient["email"], index, domain),
                       Topic.SEND_OUTCOMES)


# --- Postgres --------------------------------------------------------------------------------


def poll_until(what: str, progress: Callable[[], tuple[int, bool]], *, timeout: float,
               check: Callable[[], None]) -> None:
    """Call `progress()` -> (amount, done) until done; raise when it stalls or times out."""
    started = moved = time.monotonic()
    seen = -1
    next_say = started + 10.0
    while True:
        amount, done = progress()
        if done:
            return
        now = time.monotonic()
        if amount != seen:
            seen, moved = amount, now
        check()
        if now - moved > STALL_SECONDS or now - started > timeout:
            raise BenchError(f"{what}: stuck at {amount} after {now - started:.0f}s")
        if now >= next_say:
            say(f"  {what}: {amount:,}")
            next_say = now + 10.0
        time.sleep(POLL_SECONDS)


def projection(conn: psycopg.Connection[Any], n: int) -> tuple[int, bool]:
    """(recipients projected, complete?) of the benchmark's campaign; raises if it was refused."""
    row = conn.execute(
        "SELECT status, status_reason, chunks_received, chunks_declared,"
        " (SELECT count(*) FROM recipients WHERE campaign_id = c.campaign_id)"
        " FROM campaigns c WHERE campaign_id = %s", (CAMPAIGN_ID,)).fetchone()
    if row is None:
        return 0, False
    status, reason, received, declared, count = row
    if status != "sending":
        raise BenchError(f"the benchmark campaign is {status}: {reason}")
    return count, received >= declared and count >= n


def outcome_rows(conn: psycopg.Connection[Any], n: int) -> tuple[int, bool]:
    """(outcomes in send_log, all N there?)"""
    row = conn.execute("SELECT count(*) FROM send_log WHERE campaign_id = %s", (CAMPAIGN_ID,)).fetchone()
    count = int(row[0]) if row else 0
    return count, count >= n


def batch_span(conn: psycopg.Connection[Any]) -> Applied:
    """The reconciler's batches of the benchmark's outcomes, by transaction start."""
    rows = conn.execute(
        "SELECT recorded_at, count(*) FROM send_log WHERE campaign_id = %s GROUP BY 1 ORDER BY 1",
        (CAMPAIGN_ID,)).fetchall()
    return Applied([(stamp, int(count)) for stamp, count in rows])


def campaign_summary(conn: psycopg.Connection[Any]) -> str:
    """The campaign's status and counts after the outcomes, for the progress output."""
    row = conn.execute("SELECT status, sent, failed, pending FROM campaigns WHERE campaign_id = %s",
                       (CAMPAIGN_ID,)).fetchone()
    suppressed = conn.execute("SELECT count(*) FROM suppressions").fetchone()
    if row is None or suppressed is None:
        return "campaign missing"
    return (f"campaign {row[0]}: {row[1]:,} sent, {row[2]:,} failed, {row[3]:,} pending; "
            f"{suppressed[0]:,} suppressed")


# --- the steps --------------------------------------------------------------------------------


def project_campaign(bench: BenchRun, settings: Settings, recipients: list[dict[str, Any]],
                     timeout: float) -> str:
    """Step 1: a reconciler projects the campaign and its recipients; return its account."""
    messages = list(campaign_messages(campaign_definition(), recipients))
    service = bench.start_service("reconciler-commands", "reconciler", settings)
    say(f"projecting a campaign of {len(recipients):,} recipients ({len(messages)} commands)")
    asyncio.run(publish(settings, messages))
    with psycopg.connect(settings.database_url, autocommit=True) as conn, timed() as elapsed:
        poll_until("recipients projected", lambda: projection(conn, len(recipients)),
                   timeout=timeout, check=service.check)
        row = conn.execute("SELECT account FROM campaigns WHERE campaign_id = %s",
                           (CAMPAIGN_ID,)).fetchone()
    bench.stop_service(service)
    say(f"  projected in {elapsed():.1f}s")
    assert row is not None
    return str(row[0])


def produce_outcomes(settings: Settings, messages: Iterator[Message]) -> int:
    """Step 2: produce the outcomes keyed by send id, as the sender does; return how many."""
    producer = Producer({
        **client_config(settings), "enable.idempotence": True,
        "acks": "all", "linger.ms": 20, "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000, "message.timeout.ms": 120000,
    })
    errors: list[str] = []

    def delivered(err: KafkaError | None, msg: KafkaMessage) -> None:
        if err is not None:
            errors.append(str(err))

    topic = topic_name(Topic.SEND_OUTCOMES, settings)
    with timed() as elapsed:
        count = produce_messages(producer, topic, messages, delivered)
        remaining = producer.flush(120.0)
    if remaining or errors:
        raise BenchError(f"producing outcomes: {remaining} undelivered, errors: {errors[:3]}")
    say(f"produced {count:,} outcomes to {topic} in {elapsed():.1f}s")
    return count


def apply_outcomes(bench: BenchRun, settings: Settings, n: int, timeout: float) -> tuple[Applied, float]:
    """Step 3: a fresh reconciler applies the outcomes; their batches and its peak RSS (MiB)."""
    service: Service = bench.start_service("reconciler", "reconciler", settings)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        poll_until("outcomes applied", lambda: outcome_rows(conn, n), timeout=timeout,
                   check=service.check)
        peak = bench.stop_service(service)
        applied = batch_span(conn)
        say(f"  {campaign_summary(conn)}")
    say(f"  {applied.outcomes:,} outcomes in {len(applied.batches)} batches; {applied.timed:,} "
        f"in {applied.seconds:.2f}s from the first batch's start to the second-to-last's")
    return applied, peak


def column_types(conn: psycopg.Connection[Any], table: str) -> tuple[list[str], list[str]]:
    """The columns of `table` and their Postgres types, in table order."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,)).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows]


def copy_baseline(database_url: str, n: int) -> tuple[float, dict[str, int]]:
    """Step 4: COPY the rows the reconciler wrote into empty copies; (seconds, rows per table)."""
    with psycopg.connect(database_url) as conn:
        tables: list[tuple[str, list[str], list[str], list[tuple[Any, ...]]]] = []
        for table, where in COPIED.items():
            columns, types = column_types(conn, table)
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {where}",
                                {"campaign": CAMPAIGN_ID}).fetchall()
            conn.execute(f"CREATE TABLE bench_copy_{table} (LIKE {table} INCLUDING ALL)")
            tables.append((table, columns, types, rows))
        conn.commit()
        with timed() as elapsed:
            with conn.cursor() as cur:
                for table, columns, types, rows in tables:
                    with cur.copy(f"COPY bench_copy_{table} ({', '.join(columns)}) FROM STDIN") as copy:
                        copy.set_types(types)
                        for row in rows:
                            copy.write_row(row)
            conn.commit()
            seconds = elapsed()
    counts = {table: len(rows) for table, _, _, rows in tables}
    if counts["send_log"] != n:
        raise BenchError(f"send_log holds {counts['send_log']} rows of the campaign, not {n}")
    say(f"raw COPY of {', '.join(f'{c:,} {t}' for t, c in counts.items())} rows: {seconds:.2f}s")
    return seconds, counts


def run(bench: BenchRun, args: argparse.Namespace) -> list[Figure]:
    """Measure the reconciler against a raw COPY of the same rows (see the module docstring)."""
    n = int(args.reconciler_outcomes)
    settings = bench.settings("reconciler")
    if n <= 2 * settings.reconciler_batch_size:
        raise BenchError(f"--reconciler-outcomes must exceed two reconciler batches "
                         f"(2 x {settings.reconciler_batch_size}) to time whole batches")
    recipients = bench_recipients(n)
    account = project_campaign(bench, settings, recipients, args.timeout)
    produce_outcomes(settings, outcome_messages(CAMPAIGN_ID, account, recipients,
                                                settings.message_id_domain))
    applied, peak = apply_outcomes(bench, settings, n, args.timeout)
    copy_seconds, counts = copy_baseline(settings.database_url, n)
    failed = sum(1 for i in range(n) if i % FAILED_EVERY == FAILED_EVERY - 1)
    note = (
        f"{n:,} pre-produced outcomes ({failed:,} permanent failures, {counts['suppressions']:,} of "
        f"them hard bounces) of one campaign's recipients, applied by a fresh reconciler in "
        f"{len(applied.batches)} batches (batch size {settings.reconciler_batch_size}); span: first "
        f"to second-to-last batch transaction start (send_log.recorded_at), {applied.seconds:.2f}s "
        f"over {applied.timed:,} outcomes, start-up and the final batch's fill excluded; peak RSS "
        f"{peak:.1f} MiB. Baseline: one COPY FROM STDIN (write_row) transaction of the same "
        f"{', '.join(f'{t} ({c:,})' for t, c in counts.items())} rows into empty LIKE ... "
        f"INCLUDING ALL copies, {copy_seconds:.2f}s start to commit"
    )
    return [Figure(f"reconciler: outcomes/s into Postgres ({n:,} outcomes)", applied.rate,
                   "outcomes/s", "raw COPY of the same rows", n / copy_seconds,
                   target=0.25, note=note)]
