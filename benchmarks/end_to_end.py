"""End to end: a whole campaign through planner, senders and reconciler, twice.

Contract: `run(bench, args)` runs a small and a large campaign
(`args.e2e_recipients`, default 10,000 and 100,000), each on its own fresh
database and topics with every service restarted (planner, two senders,
reconciler), limits lifted, into the run's smtp-sink. Each is timed from just
before its start command is published to its last projection row (the latest
`recipients.updated_at` once the campaign is `completed`), after a warm-up
campaign of 64 recipients has gone through the same services. Returns the large
campaign's emails per second against the raw aiosmtplib rate at the pipeline's
SMTP concurrency (measured in this run by `benchmarks.sender.measure_raw`), and
for each service its peak RSS in the large run against the small run
(target: within 20%).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psycopg

from benchmarks.common import BenchError, BenchRun, Figure, Service, say
from services.pipeline.demo import demo_campaign, demo_recipients
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings

SENDERS = 2
WARM_UP_RECIPIENTS = 64
POLL_SECONDS = 0.5


def run(bench: BenchRun, args: argparse.Namespace) -> list[Figure]:
    """The end-to-end figures (see the module docstring)."""
    small, large = args.e2e_recipients
    small_run = campaign_run(bench, small, args.timeout)
    large_run = campaign_run(bench, large, args.timeout)
    from benchmarks.sender import measure_raw

    concurrency = SENDERS * large_run.settings.sender_concurrency
    raw = measure_raw(large_run.settings, SENDERS, min(large, 20_000), timeout=args.timeout)
    figures = [Figure(
        f"end to end: emails/s, {large:,} recipients, {SENDERS} senders", large_run.rate, "msg/s",
        f"raw aiosmtplib, {concurrency} connections", raw,
        note=f"wall {large_run.wall:.1f} s from the start command to the last projection row; "
             f"{small:,} recipients: {small_run.wall:.1f} s ({small_run.rate:.0f} msg/s)",
    )]
    for name, peak in large_run.peaks.items():
        figures.append(Figure(
            f"peak RSS {name}, {large:,} recipients", peak, "MiB",
            f"same, {small:,} recipients", small_run.peaks[name], target_max=1.2,
        ))
    return figures


class CampaignRun:
    """What one end-to-end campaign measured."""

    def __init__(self, settings: Settings, recipients: int, wall: float,
                 peaks: dict[str, float]) -> None:
        self.settings = settings
        self.recipients = recipients
        self.wall = wall
        self.peaks = peaks

    @property
    def rate(self) -> float:
        """Recipients brought to a final state per second."""
        return self.recipients / self.wall if self.wall > 0 else 0.0


def campaign_run(bench: BenchRun, recipients: int, timeout: float) -> CampaignRun:
    """Start the services, run one campaign of `recipients` to completion, stop them."""
    settings = bench.settings(f"e2e{recipients}",
                              smtp_pool_size=bench.base.sender_concurrency)
    names = ["planner", *(f"sender-{i}" for i in range(1, SENDERS + 1)), "reconciler"]
    services = [bench.start_service(f"e2e{recipients}-{name}", name.split("-")[0], settings)
                for name in names]
    wait_until_consuming(bench, settings, services)
    warm_up(settings, services, f"bench-e2e-{recipients}-warm-up-{bench.stamp}", timeout)
    campaign_id = f"bench-e2e-{recipients}-{bench.stamp}"
    campaign = demo_campaign(campaign_id)
    people = demo_recipients(recipients, bounce=f"bench-{recipients}@example.com")
    say(f"end to end: {recipients:,} recipients, services {', '.join(names)}")
    started = time.time()
    asyncio.run(publish_campaign(settings, campaign, people, settings.max_chunk_recipients))
    say(f"  published in {time.time() - started:.1f} s")
    finished = wait_for_completion(settings.database_url, campaign_id, recipients, services,
                                   timeout)
    wall = finished - started
    peaks = {name: bench.stop_service(service) for name, service in zip(names, services,
                                                                          strict=True)}
    say(f"  completed in {wall:.1f} s ({recipients / wall:.0f} msg/s); peak RSS "
        + ", ".join(f"{n} {p:.0f} MiB" for n, p in peaks.items()))
    return CampaignRun(settings, recipients, wall, peaks)


def wait_until_consuming(bench: BenchRun, settings: Settings, services: list[Service]) -> None:
    """Wait until the reconciler's endpoint answers and the groups had time to join."""
    from services.pipeline.embedded import port_open

    deadline = time.monotonic() + 120
    while not port_open("127.0.0.1", settings.http_port):
        for service in services:
            service.check()
        if time.monotonic() > deadline:
            raise BenchError("the reconciler's endpoint did not open within 120 s")
        time.sleep(0.2)


def warm_up(settings: Settings, services: list[Service], campaign_id: str, timeout: float) -> None:
    """Run a small campaign through first: the consumer groups join (3 s each on tansu) and
    every connection opens before the measured campaign starts."""
    campaign = demo_campaign(campaign_id)
    people = demo_recipients(WARM_UP_RECIPIENTS, bounce=f"{campaign_id}@example.com")
    started = time.time()
    asyncio.run(publish_campaign(settings, campaign, people, settings.max_chunk_recipients))
    wait_for_completion(settings.database_url, campaign_id, WARM_UP_RECIPIENTS, services, timeout)
    say(f"  warm-up campaign of {WARM_UP_RECIPIENTS} recipients done in {time.time() - started:.1f} s")


def wait_for_completion(database_url: str, campaign_id: str, recipients: int,
                        services: list[Service], timeout: float) -> float:
    """The epoch time of the campaign's last projection row, once it is completed."""
    deadline = time.monotonic() + timeout
    last_report = 0.0
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT c.status, count(*) FILTER (WHERE r.status NOT IN ('pending', 'deferred')),"
                " extract(epoch FROM max(r.updated_at))"
                " FROM campaigns c LEFT JOIN recipients r USING (campaign_id)"
                " WHERE c.campaign_id = %s GROUP BY c.status",
                (campaign_id,),
            ).fetchone()
            status, done, last = row if row else ("not yet seen", 0, None)
            if status == "completed" and last is not None:
                if done != recipients:
                    raise BenchError(f"{campaign_id} completed with {done} of {recipients} "
                                     "recipients in a final state")
                return float(last)
            for service in services:
                service.check()
            now = time.monotonic()
            if now - last_report >= 10:
                say(f"  {status}: {done:,} of {recipients:,} recipients done")
                last_report = now
            if now > deadline:
                raise BenchError(f"{campaign_id}: {status}, {done} of {recipients} done after "
                                 f"{timeout:.0f} s")
            time.sleep(POLL_SECONDS)
