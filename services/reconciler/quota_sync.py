"""Polling the provider's quota endpoint and publishing the quota in Redis (R7).

Contract: `QuotaSync.sync_once(source)` GETs `source.url` (header
`Authorization: <api key>` when the key is not empty, no redirects, 10 s
timeout), parses the smtp.bz-style JSON with `parse_quota`, then in one Redis
script merges `emails_available` into `keys.quota(account)` and replaces the
hash `keys.quota_info(account)` with every known field plus `synced_at` (clock
time, ISO 8601) and `source_url` (the URL without credentials, query or
fragment). A failed poll (HTTP error, timeout, no JSON, no quota in it)
raises `QuotaError` and leaves Redis untouched, so the last good value
stays. `QuotaSync.run(stop)` polls every source at its own interval (wall
seconds) until `stop` is set; a failed poll is logged with the account and
HTTP status, counted in `mailer_quota_sync_errors_total{account}`, and tried
again at the next interval. Log lines and error messages never hold
the API key nor the URL's userinfo or query.

The race: the provider's `emails_available` lags our own sends (it counts what
it has accepted; we may have sends in flight, already taken off the Redis
value by the limiter). So a sync never raises our value except by a top-up:
our value becomes min(ours + growth of theirs since the last sync, theirs).
A lower figure from the provider always wins (it saw sends we did not count).
A top-up shows in Redis at the next poll and sends resume without any
restart; a quota of 0 makes the limiter defer with `quota_exhausted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from yarl import URL

from services.pipeline.accounts import AccountsError, QuotaSource
from services.pipeline.clock import Clock
from services.pipeline.limiter_keys import LimiterKeys

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_BODY_BYTES = 1 << 20

SYNC_ERRORS = Counter(
    "mailer_quota_sync_errors_total", "Failed polls of a provider quota endpoint.", ["account"]
)
QUOTA_REMAINING = Gauge(
    "mailer_quota_remaining", "The provider's emails_available at the last good poll.", ["account"]
)

# Our field name -> the names providers use for it, first match wins. smtp.bz's
# `GET /v1/user` answers `quota` (emails left), `hlimit`/`hsent` and `dlimit`/`dsent`.
FIELD_NAMES: Mapping[str, tuple[str, ...]] = {
    "emails_available": ("emails_available", "quota", "available"),
    "hourly_limit": ("hourly_limit", "hlimit"),
    "daily_limit": ("daily_limit", "dlimit"),
    "hourly_sent": ("hourly_sent", "hsent"),
    "daily_sent": ("daily_sent", "dsent"),
}
_WRAPPERS = ("data", "user", "result")


#: Merge the provider's figure into ours, atomically: the provider has not yet counted the
#: sends in flight, so its figure never raises ours except by a top-up, the amount it grew
#: by since the last sync: new = min(ours + max(0, theirs - their_last), theirs).
#: KEYS: quota, quota_info. ARGV: theirs, then the info hash's field/value pairs.
#: Returns our previous figure (nil when there was none).
_MERGE = """
local ours = tonumber(redis.call('GET', KEYS[1]))
local last = tonumber(redis.call('HGET', KEYS[2], 'emails_available'))
local theirs = tonumber(ARGV[1])
local value = theirs
if ours and last then
    value = math.min(ours + math.max(0, theirs - last), theirs)
end
redis.call('SET', KEYS[1], value)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return ours
"""


class QuotaError(Exception):
    """A quota poll failed; the message names what, never a secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ProviderQuota:
    """One answer of the provider's quota endpoint."""

    emails_available: int
    hourly_limit: int | None = None
    daily_limit: int | None = None
    hourly_sent: int | None = None
    daily_sent: int | None = None


def parse_quota(document: Any) -> ProviderQuota:
    """The quota in an smtp.bz-style answer (flat, or wrapped in `data` / `user` / `result`)."""
    for fields in _candidates(document):
        available = _first_integer(fields, FIELD_NAMES["emails_available"])
        if available is None:
            continue
        optional = {
            name: value if (value := _first_integer(fields, names)) is None or value >= 0 else None
            for name, names in FIELD_NAMES.items()
            if name != "emails_available"
        }
        return ProviderQuota(emails_available=max(0, available), **optional)
    seen = sorted(document) if isinstance(document, dict) else type(document).__name__
    raise QuotaError(f"quota answer has no integer emails_available (or quota); top-level fields: {seen}")


def _candidates(document: Any, depth: int = 0) -> list[Mapping[str, Any]]:
    if not isinstance(document, dict):
        return []
    found: list[Mapping[str, Any]] = [document]
    if depth < 2:
        for wrapper in _WRAPPERS:
            found.extend(_candidates(document.get(wrapper), depth + 1))
    return found


def _first_integer(fields: Mapping[str, Any], names: Sequence[str]) -> int | None:
    for name in names:
        if name in fields and (value := _integer(fields[name])) is not None:
            return value
    return None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def public_url(url: str) -> str:
    """`url` fit for logs and Redis: no userinfo, query or fragment."""
    try:
        parsed = URL(url)
        if not parsed.absolute:
            return "<relative url>"
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        return "<invalid url>"


def _has_userinfo(url: str) -> bool:
    try:
        return URL(url).user is not None
    except (TypeError, ValueError):
        return False


class QuotaSync:
    """Keeps each account's provider quota in Redis."""

    def __init__(
        self,
        sources: Sequence[QuotaSource],
        redis: aioredis.Redis,
        keys: LimiterKeys,
        clock: Clock,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.sources = list(sources)
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self.timeout = timeout
        self._session_factory = session_factory or aiohttp.ClientSession
        self._session: aiohttp.ClientSession | None = None

    async def sync_once(self, source: QuotaSource) -> ProviderQuota:
        """Poll `source` once and store its quota; `QuotaError` (Redis untouched) if the poll fails."""
        if self._session is not None:
            document, status = await self._fetch(self._session, source)
        else:
            async with self._session_factory() as session:
                document, status = await self._fetch(session, source)
        try:
            quota = parse_quota(document)
        except QuotaError as exc:
            raise QuotaError(f"GET {public_url(source.url)}: {exc}", status=status) from None
        await self._store(source, quota)
        QUOTA_REMAINING.labels(source.account).set(quota.emails_available)
        return quota

    async def poll(self, source: QuotaSource) -> ProviderQuota | None:
        """`sync_once`, with a failure logged and counted instead of raised."""
        try:
            return await self.sync_once(source)
        except QuotaError as exc:
            log.warning("quota sync of account %s failed (HTTP status %s): %s",
                        source.account, exc.status if exc.status is not None else "none", exc,
                        extra={"event": "quota.sync_failed", "account": source.account})
        except RedisError as exc:
            log.warning("quota sync of account %s could not store the quota: %s: %s",
                        source.account, type(exc).__name__, exc,
                        extra={"event": "quota.sync_failed", "account": source.account})
        except Exception as exc:  # a poll must never end the loop; the message may hold a URL
            log.error("quota sync of account %s failed unexpectedly: %s", source.account,
                      type(exc).__name__, extra={"event": "quota.sync_failed", "account": source.account})
        SYNC_ERRORS.labels(source.account).inc()
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every source at its own interval until `stop` is set."""
        if not self.sources:
            await stop.wait()
            return
        self._session = self._session_factory()
        try:
            async with asyncio.TaskGroup() as group:
                for source in self.sources:
                    group.create_task(self._poll_every(source, stop))
        finally:
            session, self._session = self._session, None
            await session.close()

    async def _poll_every(self, source: QuotaSource, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll(source)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(source.interval, 0.01))

    async def _fetch(self, session: aiohttp.ClientSession, source: QuotaSource) -> tuple[Any, int]:
        """(the decoded JSON answer, its HTTP status)."""
        where = f"GET {public_url(source.url)}"
        try:
            api_key = source.api_key().strip()
        except AccountsError as exc:  # its message names the secret's source, not its value
            raise QuotaError(f"{where}: {exc}") from None
        if api_key and _has_userinfo(source.url):
            raise QuotaError(f"{where}: the URL holds credentials and an API key is set; use one of them")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = api_key
        try:
            async with session.get(
                source.url, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                if not 200 <= response.status < 300:
                    raise QuotaError(f"{where}: HTTP {response.status}", status=response.status)
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise QuotaError(f"{where}: answer larger than {MAX_BODY_BYTES} bytes",
                                         status=response.status)
                status = response.status
        except TimeoutError:
            raise QuotaError(f"{where}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:  # str(exc) may hold the full URL: name the type only
            raise QuotaError(f"{where}: request failed ({type(exc).__name__})") from None
        except ValueError as exc:  # a URL aiohttp cannot use
            raise QuotaError(f"{where}: request not possible ({type(exc).__name__})") from None
        try:
            return orjson.loads(bytes(body)), status
        except orjson.JSONDecodeError:
            raise QuotaError(f"{where}: answer is not JSON", status=status) from None

    async def _store(self, source: QuotaSource, quota: ProviderQuota) -> None:
        info: dict[FieldT, EncodableT] = {
            name: str(value) for name, value in asdict(quota).items() if value is not None
        }
        info["synced_at"] = self.clock.now().isoformat()
        info["source_url"] = public_url(source.url)
        key, info_key = self.keys.quota(source.account), self.keys.quota_info(source.account)
        previous = await self.redis.eval(
            _MERGE, 2, key, info_key, quota.emails_available, *(x for kv in info.items() for x in kv)
        )
        before = _integer(previous.decode() if isinstance(previous, bytes) else previous)
        if quota.emails_available > 0 and before == 0:
            log.info("quota of account %s topped up: %d emails available", source.account,
                     quota.emails_available)
        elif quota.emails_available == 0 and before != 0:
            log.warning("quota of account %s is exhausted: sends defer with quota_exhausted",
                        source.account)
