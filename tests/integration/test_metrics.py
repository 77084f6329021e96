"""Each service serves /metrics with the pipeline's series, bounded labels only (R23)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from services.pipeline.embedded import free_port
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from tests.support.campaigns import campaign, recipients
from tests.support.poll import wait_for_status
from tests.support.processes import ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, series: str) -> float:
    """The sample of `series` (name with its labels exactly as exposed)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {series!r} in:\n{text[:3000]}")


def scrape_until(port: int, series: str, expected: float, within: float) -> str:
    """The first scrape in which `series` equals `expected`, or the last one after `within` s."""
    deadline = time.monotonic() + within
    while True:
        text = scrape(port)
        if value(text, series) == expected or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_services_serve_metrics_during_a_campaign(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer,
) -> None:
    ports = {name: free_port() for name in ("planner", "sender", "reconciler")}
    for name, port in ports.items():
        services.start(name, "--metrics-port", str(port))
    people = recipients(30, domain="metrics.example.com")
    smtp_server.reject(people[0]["email"])
    asyncio.run(publish_campaign(settings, campaign("measured"), people))
    wait_for_status(settings, services, "measured", "completed")

    sender = scrape(ports["sender"])
    assert value(sender, 'mailer_sends_total{error_class="none",outcome="sent"}') == 29
    assert value(sender, 'mailer_sends_total{error_class="permanent",outcome="failed"}') == 1
    assert value(sender, 'mailer_smtp_duration_seconds_count{outcome="sent"}') == 29
    assert value(sender, 'mailer_limiter_decisions_total{decision="granted",reason="none"}') >= 30
    # the queue gauges are refreshed by the reconciler's scheduler pass (every
    # MAILER_RELEASE_INTERVAL): the completion may be up to one pass newer than they are
    reconciler = scrape_until(ports["reconciler"], 'mailer_campaigns{state="completed"}', 1,
                              within=3 * settings.release_interval + 2)
    assert value(reconciler, 'mailer_campaigns{state="completed"}') == 1
    assert value(reconciler, "mailer_recipients_pending") == 0
    assert value(reconciler, "mailer_campaign_duration_seconds_count") == 1
    assert value(reconciler, "mailer_campaign_stalled_seconds") == 0
    assert value(reconciler, 'mailer_circuit_breakers_open{scope="account"}') == 0
    assert "mailer_dead_letters_total" in scrape(ports["planner"])
    # the reconciler exports the consumer groups' lag (services/pipeline/consumer_lag.py) every
    # 15 s, the first time once it has measured every group (a few seconds after it starts)
    sender_group = settings.app_id("sender")
    deadline = time.monotonic() + 30
    while f'kminion_kafka_consumer_group_info{{group_id="{sender_group}",' not in reconciler \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        reconciler = scrape(ports["reconciler"])
    states = [line for line in reconciler.splitlines()
              if line.startswith(f'kminion_kafka_consumer_group_info{{group_id="{sender_group}",')]
    assert len(states) == 1 and states[0].endswith(" 1.0"), states  # the current state only
    assert f'kafka_consumergroup_group_max_lag_seconds{{group="{sender_group}"}}' in reconciler
    assert value(reconciler, f'mailer_consumer_group_stalled{{group="{sender_group}"}}') == 0
    for text in (sender, reconciler):
        assert "metrics.example.com" not in text and "measured" not in text  # no per-recipient labels
