"""Sending discipline on real components and a shared compressed clock (issue 3).

Every test runs the real planner, sender(s) and reconciler against the real
broker, Postgres, Redis and an SMTP server. Time is a compressed clock every
process reads from one file (MAILER_CLOCK_FILE); a test moves it forward
instead of waiting real hours. Deliveries are timed by the SMTP server and
converted to clock time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from tests.support.campaigns import campaign, recipients
from tests.support.limits import (
    GrantWatcher,
    delivery_clock_times,
    most_in_any_window,
    with_account,
    with_clock,
)
from tests.support.processes import ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

MSK = ZoneInfo("Europe/Moscow")


def msk(*args: int) -> datetime:
    return datetime(*args, tzinfo=MSK)  # type: ignore[misc]


def view(settings: Settings, campaign_id: str, lang: str = "ru") -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{settings.http_port}/campaigns/{campaign_id}",
        headers={"Accept-Language": lang},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return dict(orjson.loads(resp.read()))
    except OSError:
        return {}


def wait_until(what: str, check: Callable[[], bool], services: ServiceRunner,
               timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{services.logs()}")


def start(services: ServiceRunner, *names: str) -> None:
    for name in names:
        services.start(name)


def publish(settings: Settings, campaign_id: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    people = recipients(n, domain=f"{campaign_id}.example.com")
    asyncio.run(publish_campaign(settings, campaign(campaign_id, **fields), people, chunk_size=500))
    return people


def sent_to(smtp: SmtpServer, campaign_id: str) -> int:
    suffix = f"@{campaign_id}.example.com"
    return sum(n for address, n in smtp.delivered().items() if address.endswith(suffix))


def test_three_senders_keep_100_per_hour_and_use_it(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: Callable[..., list[tuple]],
) -> None:
    start_at = msk(2026, 11, 30, 10, 0)  # a Monday
    settings, clock = with_clock(settings, tmp_path, start_at, speed=10)
    settings = with_account(settings, tmp_path, hourly_rate=100)
    watcher = GrantWatcher(settings.redis_url, LimiterKeys(settings.redis_key_prefix).account_rate("default"))
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "sender", "sender", "reconciler")
        publish(settings, "hourly", 250)
        wait_until("the first hour's 100", lambda: len(smtp_server.messages()) >= 100, services)
        first = view(settings, "hourly")
        eta = datetime.fromisoformat(first["eta"]["finish_at"].replace("Z", "+00:00"))
        wait_until("the deferral", lambda: view(settings, "hourly").get("status") == "deferred", services)
        deferred = view(settings, "hourly", "en")
        assert deferred["defer_reason"] == "rate_per_hour"
        time.sleep(2)
        assert len(smtp_server.messages()) == 100  # the window is full: nothing more
        clock.jump(msk(2026, 11, 30, 10, 59, 30))
        wait_until("the second hour's 100", lambda: len(smtp_server.messages()) >= 200, services)
        clock.jump(msk(2026, 11, 30, 11, 59, 30))
        wait_until("completion", lambda: view(settings, "hourly").get("status") == "completed", services)
        finished = clock.now()
    grants = watcher.stop()

    delivered = smtp_server.delivered()
    assert len(delivered) == 250 and set(delivered.values()) == {1}
    # The limiter's own record: no 60-minute window ever held more than 100 grants.
    assert len(grants) >= 250 - 100  # the watcher saw the last hour's grants at least
    assert most_in_any_window(grants) <= 100
    # The SMTP server's view, in clock time: the same, and the saturated hours are used.
    at = sorted(delivery_clock_times(smtp_server, clock).values())
    assert most_in_any_window(at, 3600.0 - 10.0) <= 100  # 10 clock s = 1 wall s of latency
    hour = lambda h: sum(1 for t in at if msk(2026, 11, 30, h).timestamp() <= t  # noqa: E731
                         < msk(2026, 11, 30, h + 1).timestamp())
    assert hour(10) >= 98 and hour(11) >= 98, [hour(10), hour(11), hour(12)]
    assert deferred["reason"].startswith("Reached the limit of 100 emails per hour")
    error = abs((eta - finished).total_seconds())
    print(f"\nsaturated hours: {hour(10)} and {hour(11)} of 100; ETA {eta:%H:%M:%S} vs finished "
          f"{finished:%H:%M:%S} (error {error / 60:.1f} min)")
    assert error <= 15 * 60
    assert sql("SELECT count(*) FROM parked_sends WHERE released_at IS NULL") == [(0,)]
