"""Sending discipline on real components and a shared compressed clock (issue 3).

Every test runs the real planner, sender(s) and reconciler against the real
broker, Postgres, Redis and an SMTP server. Time is a compressed clock every
process reads from one file (MAILER_CLOCK_FILE); a test moves it forward
instead of waiting real hours. Deliveries are timed by the SMTP server and
converted to clock time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from services.pipeline.embedded import free_port
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import read_topic
from tests.support.limits import (
    GrantWatcher,
    PrivateRedis,
    delivery_clock_times,
    most_in_any_window,
    with_account,
    with_clock,
)
from tests.support.poll import auth_headers
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
        headers={"Accept-Language": lang, **auth_headers()},
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
        publish(settings, "hourly", 250, deadline="2026-11-30T08:30:00Z")  # 11:30 MSK: too early
        wait_until("the first hour's 100 projected and deferred", lambda: view(settings, "hourly").get(
            "counts", {}).get("sent") == 100 and view(settings, "hourly")["status"] == "deferred", services)
        deferred = view(settings, "hourly", "en")
        eta = datetime.fromisoformat(deferred["eta"]["finish_at"].replace("Z", "+00:00"))
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
    # the receipts lag the grants by the send latency: allow 60 clock s (6 wall s at speed 10)
    assert most_in_any_window(at, 3600.0 - 60.0) <= 100
    hour = lambda h: sum(1 for t in at if msk(2026, 11, 30, h).timestamp() <= t  # noqa: E731
                         < msk(2026, 11, 30, h + 1).timestamp())
    assert hour(10) >= 98 and hour(11) >= 98, [hour(10), hour(11), hour(12)]
    assert deferred["reason"].startswith("Reached the limit of 100 emails per hour")
    assert deferred["deadline_warning"] is True  # 250 at 100/h cannot be done by 11:30 (B1)
    error = abs((eta - finished).total_seconds())
    eta, finished = eta.astimezone(MSK), finished.astimezone(MSK)
    print(f"\nsaturated hours: {hour(10)} and {hour(11)} of 100; ETA {eta:%H:%M:%S} vs finished "
          f"{finished:%H:%M:%S} (error {error / 60:.1f} min)")
    assert error <= 15 * 60
    assert sql("SELECT count(*) FROM parked_sends WHERE released_at IS NULL") == [(0,)]


def test_campaign_started_at_1755_stops_at_1800_and_resumes_at_0900(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer,
) -> None:
    settings, clock = with_clock(settings, tmp_path, msk(2026, 12, 3, 17, 55), speed=10)  # Thursday
    settings = with_account(settings, tmp_path, hourly_rate=60, working_hours={
        "hours": "09:00-18:00", "days": "1-5", "time_zone": "Europe/Moscow"})
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        publish(settings, "evening", 100)
        wait_until("the hour's 60", lambda: len(smtp_server.messages()) >= 60, services)
        wait_until("the evening stop", lambda: view(settings, "evening").get("defer_reason")
                   == "outside_hours", services)
        ru, en = view(settings, "evening"), view(settings, "evening", "en")
        clock.jump(msk(2026, 12, 3, 18, 30))
        time.sleep(2)
        assert len(smtp_server.messages()) == 60  # 18:00-09:00: nothing
        clock.jump(msk(2026, 12, 4, 8, 59, 30))
        wait_until("completion", lambda: view(settings, "evening").get("status") == "completed",
                   services)
    friday_nine = msk(2026, 12, 4, 9, 0)
    assert ru["status"] == "deferred"
    assert ru["next_run_at"] == ru["deferred_until"] == "2026-12-04T06:00:00Z"
    assert "09:00" in ru["reason"] and "вне рабочего времени" in ru["reason"].lower()
    assert "09:00" in en["reason"] and "working hours" in en["reason"]
    at = delivery_clock_times(smtp_server, clock)
    assert len(at) == 100
    evening = sorted(t for t in at.values() if t < friday_nine.timestamp())
    assert len(evening) == 60 and evening[-1] < msk(2026, 12, 3, 18, 0).timestamp()
    assert min(t for t in at.values() if t >= friday_nine.timestamp()) >= friday_nine.timestamp()


def test_daily_limit_defers_to_the_next_working_morning(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer,
) -> None:
    settings, clock = with_clock(settings, tmp_path, msk(2026, 11, 30, 10, 0), speed=10)  # Monday
    settings = with_account(settings, tmp_path, daily_limit_per_manager=20, working_hours={
        "hours": "09:00-18:00", "days": "1-5", "time_zone": "Europe/Moscow"})
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        publish(settings, "daily", 30)
        wait_until("the daily limit", lambda: view(settings, "daily").get("defer_reason")
                   == "daily_limit", services)
        deferred = view(settings, "daily")
        assert len(smtp_server.messages()) == 20
        clock.jump(msk(2026, 12, 1, 8, 59, 40))
        wait_until("completion", lambda: view(settings, "daily").get("status") == "completed", services)
    assert deferred["deferred_until"] == "2026-12-01T06:00:00Z"  # Tuesday 09:00 MSK
    assert "20/20" in deferred["reason"] and "09:00" in deferred["reason"]
    at = delivery_clock_times(smtp_server, clock)
    assert len(at) == 30
    assert sum(1 for t in at.values() if t >= msk(2026, 12, 1, 9, 0).timestamp()) == 10


def test_quota_exhaustion_defers_and_a_top_up_resumes(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer,
) -> None:
    provider = QuotaProvider(smtp_server, bought=30)
    provider.start()
    try:
        settings = with_account(settings, tmp_path, quota={"url": provider.url, "interval": 0.3,
                                                           "api_key_env": "NO_SUCH_KEY"})
        with run_services(settings, tmp_path / "logs") as services:
            start(services, "planner", "sender", "reconciler")
            publish(settings, "quota", 50)
            wait_until("the quota to run out", lambda: view(settings, "quota").get("defer_reason")
                       == "quota_exhausted", services)
            time.sleep(1.5)
            exhausted = view(settings, "quota")
            assert len(smtp_server.messages()) == 30
            provider.bought = 100  # the administrator tops the quota up; nothing restarts
            wait_until("completion", lambda: view(settings, "quota").get("status") == "completed",
                       services)
            statuses = [orjson.loads(m.value()) for m in read_topic(
                settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings),
                idle=2.0)]
    finally:
        provider.stop()
    assert exhausted["status"] == "deferred"
    assert "квота" in exhausted["reason"].lower()
    assert len(smtp_server.delivered()) == 50
    quota_events = [s for s in statuses if s.get("defer_reason") == "quota_exhausted"]
    assert len(quota_events) == 1  # re-evaluating the same deferral published nothing new
    assert [s["status"] for s in statuses][-1] == "completed"


def test_high_priority_overtakes_and_equal_priorities_share(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer,
) -> None:
    settings, clock = with_clock(settings, tmp_path, msk(2026, 11, 30, 10, 0), speed=10)
    settings = with_account(settings, tmp_path, hourly_rate=60)
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        publish(settings, "low", 200, priority=5)
        wait_until("low's first hour", lambda: len(smtp_server.messages()) >= 60, services)
        publish(settings, "high", 20, priority=9)
        publish(settings, "peer", 200, priority=5)
        wait_until("high and peer parked", lambda: view(settings, "high").get("status") == "deferred"
                   and view(settings, "peer").get("status") == "deferred", services)
        clock.jump(msk(2026, 11, 30, 10, 59, 30))
        wait_until("high to finish", lambda: view(settings, "high").get("status") == "completed",
                   services)
        wait_until("the second hour's 60", lambda: len(smtp_server.messages()) >= 120, services)
        time.sleep(1)
        second_hour = {c: sent_to(smtp_server, c) for c in ("low", "high", "peer")}
        clock.jump(msk(2026, 11, 30, 11, 59, 30))
        wait_until("the third hour's 60", lambda: len(smtp_server.messages()) >= 180, services)
        time.sleep(1)
        third_hour = {c: sent_to(smtp_server, c) for c in ("low", "high", "peer")}
    # high (priority 9) took its 20 of the second hour's 60 although low was queued first
    assert second_hour["high"] == 20
    assert second_hour["low"] + second_hour["peer"] == 100
    # low and peer (both 5) share the rest: 40 in the second hour, 60 in the third
    low2, peer2 = second_hour["low"] - 60, second_hour["peer"]
    assert abs(low2 - peer2) <= 4, second_hour
    low3, peer3 = third_hour["low"] - second_hour["low"], third_hour["peer"] - second_hour["peer"]
    assert low3 + peer3 == 60 and abs(low3 - peer3) <= 4, third_hour
    print(f"\nsecond hour: high 20, low {low2}, peer {peer2}; third hour: low {low3}, peer {peer3}")


def test_a_deferred_campaign_does_not_hold_up_its_partition(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer,
) -> None:
    settings = replace(settings, send_commands_partitions=1)  # every command on one partition
    settings = with_account(settings, tmp_path)
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        publish(settings, "slow", 50, rate_per_hour=2)  # its own rate: 2 an hour
        publish(settings, "fast", 300)
        began = time.monotonic()
        wait_until("fast to finish", lambda: view(settings, "fast").get("status") == "completed",
                   services)
        took = time.monotonic() - began
        # slow's deferrals come on other outcome partitions than fast's last outcomes
        wait_until("slow to show as deferred",
                   lambda: view(settings, "slow").get("status") == "deferred", services, timeout=30)
        slow = view(settings, "slow")
    assert slow["status"] == "deferred" and slow["defer_reason"] == "campaign_rate"
    assert sent_to(smtp_server, "slow") == 2
    assert sent_to(smtp_server, "fast") == 300
    print(f"\n300 sends of 'fast' behind 48 parked 'slow' commands on one partition: {took:.1f}s")


def test_redis_stopped_under_fail_closed_sends_nothing_loses_nothing(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: Callable[..., list[tuple]],
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    smtp_server.handler.data_delay = 0.02
    settings = replace(settings, redis_url=private.url, sender_concurrency=2)
    settings = with_account(settings, tmp_path)
    try:
        with run_services(settings, tmp_path / "logs") as services:
            start(services, "planner", "sender", "reconciler")
            publish(settings, "outage", 400)
            wait_until("the first sends", lambda: len(smtp_server.messages()) >= 60, services)
            private.stop()
            time.sleep(1.0)  # sends already admitted may still land
            frozen = len(smtp_server.messages())
            wait_until("limiter_unavailable", lambda: view(settings, "outage").get("defer_reason")
                       == "limiter_unavailable", services)
            time.sleep(3)
            assert len(smtp_server.messages()) == frozen  # fail_closed: nothing without Redis
            private.start()  # back, empty: the reconciler restores the limiter from send_log
            wait_until("completion", lambda: view(settings, "outage").get("status") == "completed",
                       services, timeout=120)
    finally:
        private.stop()
    delivered = smtp_server.delivered()
    assert len(delivered) == 400 and set(delivered.values()) == {1}
    assert sql("SELECT status, count(*) FROM recipients GROUP BY status") == [("sent", 400)]
    print(f"\nRedis down after {frozen} sends; nothing sent while it was down; 400/400 after")


class QuotaProvider:
    """An smtp.bz-style quota endpoint: emails left = bought - delivered so far."""

    def __init__(self, smtp: SmtpServer, bought: int) -> None:
        self.smtp = smtp
        self.bought = bought
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/user"
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                left = max(0, provider.bought - len(provider.smtp.messages()))
                body = orjson.dumps({"quota": left, "hlimit": 1000, "hsent": 0})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def test_slow_down_reply_cuts_the_rate_then_successes_restore_it(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: Callable[..., list[tuple]],
) -> None:
    settings = replace(settings, transient_retry_seconds=1.0, sender_concurrency=1)
    settings = with_account(settings, tmp_path, hourly_rate=100000)
    people = recipients(40, domain="adaptive.example.com")
    throttled = people[0]["email"]
    smtp_server.handler.slow_down_once.add(throttled)
    factor_key = LimiterKeys(settings.redis_key_prefix).adaptive("default")
    seen = FactorWatcher(settings.redis_url, factor_key)
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        asyncio.run(publish_campaign(settings, campaign("adaptive"), people))
        wait_until("completion", lambda: view(settings, "adaptive").get("status") == "completed",
                   services)
    lowest, last = seen.stop()
    assert smtp_server.delivered()[throttled.lower()] == 1  # retried once, delivered once
    assert sql("SELECT attempt, outcome, smtp_code FROM send_log WHERE recipient = %s ORDER BY attempt",
               throttled) == [(1, "deferred", 451), (2, "sent", 250)]
    assert 0.5 <= lowest < 0.6  # the 451 halved the account's rate (successes then add 0.05)
    assert last is None  # 39 successes brought it back to exactly 1 (the key is gone)


class FactorWatcher:
    """Samples a Redis float key: the lowest value seen and the last one (None: absent)."""

    def __init__(self, url: str, key: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.key = key
        self.lowest = 1.0
        self.last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            raw = self.client.get(self.key)
            self.last = None if raw is None else float(raw)  # type: ignore[arg-type]
            if self.last is not None:
                self.lowest = min(self.lowest, self.last)
            self._stop.wait(0.02)

    def stop(self) -> tuple[float, float | None]:
        self._stop.set()
        self._thread.join()
        raw = self.client.get(self.key)
        self.client.close()
        return self.lowest, None if raw is None else float(raw)  # type: ignore[arg-type]
