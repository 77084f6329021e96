"""Provider quota sync against a real HTTP server (aiohttp on loopback) and a real Redis.

The server answers like smtp.bz's `GET /v1/user`. Covers storing the quota
and its info, a top-up showing up at the next poll of `run`, failures that
keep the last good value and are counted, and the API key staying out of logs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import REGISTRY

from services.pipeline.accounts import QuotaSource
from services.pipeline.limiter_keys import LimiterKeys
from services.reconciler.quota_sync import ProviderQuota, QuotaError, QuotaSync, parse_quota

pytestmark = pytest.mark.integration

API_KEY = "sk-test-5f3a9c0e1b7d"
SYNCED_AT = datetime(2026, 3, 20, 9, 0, tzinfo=UTC)


class FixedClock:
    def time(self) -> float:
        return SYNCED_AT.timestamp()

    def now(self) -> datetime:
        return SYNCED_AT


@dataclass
class Provider:
    """What the test's quota endpoint answers next, and what it was asked."""

    url: str = ""
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    requests: list[dict[str, str]] = field(default_factory=list)

    def answer(self, document: Any, status: int = 200) -> None:
        self.status, self.body = status, orjson.dumps(document)


def smtp_bz_user(quota: int) -> dict[str, Any]:
    """An answer shaped like smtp.bz's `GET /v1/user`."""
    return {"tarif": "free", "expires_quota": "2026-04-19", "quota": quota, "tarif_quota": 15000,
            "hlimit": 100, "hsent": 6, "dlimit": 5000, "dsent": 120}


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    state = Provider()
    state.answer(smtp_bz_user(1000))

    async def user(request: web.Request) -> web.Response:
        state.requests.append(dict(request.headers))
        if state.delay:
            await asyncio.sleep(state.delay)
        return web.Response(body=state.body, status=state.status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/user", user)
    runner = web.AppRunner(app, access_log=None)  # its access log would show the query
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/v1/user"
    yield state
    await runner.cleanup()


@pytest.fixture
def account() -> str:
    """An account name no other test uses, so its metrics start at zero."""
    return f"acct-{uuid.uuid4().hex[:8]}"


def source(account: str, url: str, api_key: str = API_KEY, interval: float = 60.0) -> QuotaSource:
    return QuotaSource(account, url, lambda: api_key, interval)


def errors(account: str) -> float:
    return REGISTRY.get_sample_value("mailer_quota_sync_errors_total", {"account": account}) or 0.0


async def stored(redis_client: aioredis.Redis, keys: LimiterKeys, account: str) -> int | None:
    value = await redis_client.get(keys.quota(account))
    return None if value is None else int(value)


async def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        smtp_bz_user(42),
        {"emails_available": 42, "hourly_limit": 100, "hourly_sent": 6, "daily_limit": 5000,
         "daily_sent": 120},
        {"data": {"quota": "42", "hlimit": "100", "hsent": 6, "dlimit": 5000.0, "dsent": 120}},
        {"user": smtp_bz_user(42)},
        {"status": "ok", "data": {"user": smtp_bz_user(42)}},
    ],
)
def test_parse_quota_reads_long_short_and_nested_names(document: Any) -> None:
    assert parse_quota(document) == ProviderQuota(42, hourly_limit=100, daily_limit=5000,
                                                  hourly_sent=6, daily_sent=120)


def test_parse_quota_leaves_unknown_fields_empty_and_clamps_negatives() -> None:
    assert parse_quota({"quota": -3}) == ProviderQuota(0)
    assert parse_quota({"quota": 5, "hlimit": "lots", "dlimit": -1}) == ProviderQuota(5)


@pytest.mark.parametrize("document", [{}, {"quota": None}, {"quota": True}, {"quota": "many"},
                                      {"tarif": "free"}, [1, 2], "quota", {"quota": {"left": 5}}])
def test_parse_quota_without_emails_available_is_an_error(document: Any) -> None:
    with pytest.raises(QuotaError, match="emails_available"):
        parse_quota(document)


# --- against the server ------------------------------------------------------------


async def test_sync_once_stores_quota_and_info(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    provider.answer(smtp_bz_user(1234))
    sync = QuotaSync([], redis_client, keys, FixedClock())
    quota = await sync.sync_once(source(account, provider.url + "?lang=ru#top"))

    assert quota == ProviderQuota(1234, hourly_limit=100, daily_limit=5000, hourly_sent=6, daily_sent=120)
    assert await stored(redis_client, keys, account) == 1234
    info = await redis_client.hgetall(keys.quota_info(account))
    assert info == {
        "emails_available": "1234", "hourly_limit": "100", "daily_limit": "5000", "hourly_sent": "6",
        "daily_sent": "120", "synced_at": SYNCED_AT.isoformat(), "source_url": provider.url,
    }
    assert provider.requests[-1]["Authorization"] == API_KEY  # the key itself, no scheme
    assert REGISTRY.get_sample_value("mailer_quota_remaining", {"account": account}) == 1234

    provider.answer({"emails_available": 7})  # fields the provider stops sending are removed
    await sync.sync_once(source(account, provider.url))
    fields = set(await redis_client.hkeys(keys.quota_info(account)))
    assert fields == {"emails_available", "synced_at", "source_url"}


async def test_no_authorization_header_without_api_key(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    sync = QuotaSync([], redis_client, keys, FixedClock())
    await sync.sync_once(source(account, provider.url, api_key=""))
    assert "Authorization" not in provider.requests[-1]


async def test_top_up_shows_after_next_run_cycle(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    provider.answer(smtp_bz_user(0))
    sync = QuotaSync([source(account, provider.url, interval=0.1)], redis_client, keys, FixedClock())
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        async def exhausted() -> bool:
            return await stored(redis_client, keys, account) == 0

        await wait_for(exhausted)
        polls = len(provider.requests)
        provider.answer(smtp_bz_user(500))  # the manager paid: a top-up

        async def topped_up() -> bool:
            return await stored(redis_client, keys, account) == 500

        await wait_for(topped_up, timeout=2.0)
        assert len(provider.requests) > polls
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert errors(account) == 0


async def test_failures_keep_last_value_and_are_counted(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    sync = QuotaSync([], redis_client, keys, FixedClock(), timeout=0.3)
    src = source(account, provider.url)
    provider.answer(smtp_bz_user(77))
    assert await sync.poll(src) is not None
    info_before = await redis_client.hgetall(keys.quota_info(account))

    provider.answer({"error": "internal"}, status=500)
    with pytest.raises(QuotaError, match="HTTP 500") as failed:
        await sync.sync_once(src)
    assert failed.value.status == 500

    def not_json() -> None:
        provider.status, provider.body = 200, b"<html>maintenance</html>"

    failures: list[Callable[[], None]] = [
        lambda: provider.answer({"error": "internal"}, status=500),
        not_json,
        lambda: provider.answer({"tarif": "free"}),  # no quota field
    ]
    for n, fail in enumerate(failures, start=1):
        fail()
        assert await sync.poll(src) is None
        assert errors(account) == n
        assert await stored(redis_client, keys, account) == 77
        assert await redis_client.hgetall(keys.quota_info(account)) == info_before

    provider.answer(smtp_bz_user(78))
    provider.delay = 1.0  # slower than the timeout
    assert await sync.poll(src) is None
    assert errors(account) == 4
    assert await stored(redis_client, keys, account) == 77

    provider.delay = 0.0
    assert await sync.poll(src) == parse_quota(smtp_bz_user(78))
    assert await stored(redis_client, keys, account) == 78


async def test_run_keeps_polling_through_failures(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    provider.answer({"error": "down"}, status=503)
    sync = QuotaSync([source(account, provider.url, interval=0.05)], redis_client, keys, FixedClock())
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        async def failed_twice() -> bool:
            return errors(account) >= 2

        await wait_for(failed_twice)
        assert await stored(redis_client, keys, account) is None  # never synced: quota unknown
        provider.answer(smtp_bz_user(9))

        async def synced() -> bool:
            return await stored(redis_client, keys, account) == 9

        await wait_for(synced)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def test_api_key_and_url_secrets_never_reach_logs(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sync = QuotaSync([], redis_client, keys, FixedClock(), timeout=0.3)
    with_query = provider.url + "?token=query-secret-91"
    host_port = provider.url.split("//")[1]
    with_userinfo = f"http://quota-user:userinfo-secret-37@{host_port}"

    provider.answer({"error": f"bad key {API_KEY}"}, status=500)  # even an echoing server
    assert await sync.poll(source(account, with_query)) is None
    assert await sync.poll(source(account, with_userinfo, api_key="")) is None
    assert provider.requests[-1]["Authorization"].startswith("Basic ")  # credentials from the URL
    assert await sync.poll(source(account, with_userinfo)) is None  # URL credentials and a key
    provider.answer({"quota": "n/a", "key": API_KEY})
    assert await sync.poll(source(account, with_query)) is None
    provider.body, provider.status = f"oops {API_KEY}".encode(), 200
    assert await sync.poll(source(account, with_query)) is None
    provider.delay = 1.0
    assert await sync.poll(source(account, with_query)) is None
    closed_port = "http://quota-user:userinfo-secret-37@127.0.0.1:1/v1/user?token=query-secret-91"
    assert await sync.poll(source(account, closed_port, api_key="")) is None

    assert errors(account) == 7
    text = caplog.text
    assert account in text and "HTTP status 500" in text and provider.url in text
    for secret in (API_KEY, "query-secret-91", "userinfo-secret-37", "quota-user"):
        assert secret not in text


async def test_a_lagging_provider_never_gives_back_sends_in_flight(
    provider: Provider, redis_client: aioredis.Redis, keys: LimiterKeys, account: str
) -> None:
    sync = QuotaSync([], redis_client, keys, FixedClock())
    provider.answer(smtp_bz_user(30))
    await sync.sync_once(source(account, provider.url))
    await redis_client.decrby(keys.quota(account), 30)  # the limiter reserved 30 sends
    provider.answer(smtp_bz_user(12))  # the provider has accepted only 18 of them so far
    await sync.sync_once(source(account, provider.url))
    assert await stored(redis_client, keys, account) == 0  # not 12: those are in flight
    provider.answer(smtp_bz_user(0))
    await sync.sync_once(source(account, provider.url))
    assert await stored(redis_client, keys, account) == 0
    provider.answer(smtp_bz_user(100))  # a top-up of 100
    await sync.sync_once(source(account, provider.url))
    assert await stored(redis_client, keys, account) == 100
    await redis_client.decrby(keys.quota(account), 10)
    provider.answer(smtp_bz_user(95))  # it counted 5 of our 10, and nothing else changed
    await sync.sync_once(source(account, provider.url))
    assert await stored(redis_client, keys, account) == 90
    provider.answer(smtp_bz_user(40))  # someone else used the account: the provider knows best
    await sync.sync_once(source(account, provider.url))
    assert await stored(redis_client, keys, account) == 40
