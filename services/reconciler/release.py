"""Bringing parked sends back when they are due, by priority and fairly (R5, R9).

Contract: `Releaser.release_due()` runs one pass, under a Postgres advisory
lock so one reconciler releases at a time. For each account with due rows of
sending campaigns it asks the limiter how many sends it could grant now and
hands that capacity out: higher priority first; within a priority, campaigns
share: each send goes to the campaign that has been served least since it
began competing (a newcomer starts level with the least served; ties go to the
earlier queue time), so none starves. The chosen rows are republished to the send-commands topic (a fresh
message_id, keyed by send_id), the broker's acks awaited, and only then marked
released in the same transaction; a failure releases nothing. Due rows that
get no capacity because a limit refuses are re-dated to that limit's retry
time and reason, so the campaign's queue state says what it really waits for.
Sends released lately whose outcome has not come back are taken off the
capacity (the limiter may not have counted them yet); a send released beyond
it anyway is refused by the limiter and parked again, so the limits stay
exact either way. Open circuit breakers hold back what they cover: nothing of a
campaign whose breaker is open, nothing of an account whose breaker is open,
and one send (its probe) of an account whose breaker is half-open; each pass
first resumes the campaigns a breaker paused once their breakers let sends
through again (`resume_held`). Returns how many sends were released; never sleeps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.pipeline import circuit_breaker
from services.pipeline.accounts import Accounts
from services.pipeline.clock import Clock
from services.pipeline.contract import new_message_id
from services.pipeline.producer import AsyncProducer
from services.reconciler import status_events
from services.reconciler.deferrals import refresh_queue_state
from services.reconciler.projections import StatusChange, change_status
from services.sender.rate_limit import Capacity, Limiter, LimitRequest
from services.sender.send_gate import limit_request, parked_until, sending_windows

log = logging.getLogger(__name__)

_LOCK_KEY = 0x72656C73  # "rels"
#: How far back (clock time) a released send without an outcome counts as in flight.
IN_FLIGHT_HORIZON = timedelta(minutes=10)


@dataclass
class _Due:
    """The due parked sends of one campaign on one account."""

    campaign_id: str
    account: str
    priority: int
    queued_at: datetime
    count: int
    manager_id: str
    rate_per_hour: int
    sample: dict[str, Any]  # one parked command, to build the limit request


class Releaser:
    """Releases due parked sends within the limiter's capacity."""

    def __init__(
        self, pool: AsyncConnectionPool, producer: AsyncProducer, limiter: Limiter,
        accounts: Accounts, clock: Clock, send_topic: str, status_topic: str,
        max_per_pass: int = 5000,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.limiter = limiter
        self.accounts = accounts
        self.clock = clock
        self.send_topic = send_topic
        self.status_topic = status_topic
        self.max_per_pass = max_per_pass
        # sends released per campaign while it competed (virtual time of the fair share)
        self.served: dict[str, int] = {}

    async def release_due(self) -> int:
        """One pass: release what the limits allow; return how many sends were released."""
        now = self.clock.now()
        released = 0
        touched: set[str] = set()
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0
            resumed = await resume_held(conn)
            held_accounts, held_campaigns = await circuit_breaker.held_back(conn)
            by_account: dict[str, list[_Due]] = defaultdict(list)
            everything_due = [d for d in await self._due(conn, now)  # what an open breaker holds
                              if d.campaign_id not in held_campaigns
                              and held_accounts.get(d.account, True)]
            for due in everything_due:
                by_account[due.account].append(due)
            competing = {d.campaign_id for d in everything_due}  # who stops competing is forgotten
            self.served = {c: n for c, n in self.served.items() if c in competing}
            for account, dues in by_account.items():
                in_flight = await self._in_flight(conn, account, now)
                if account in held_accounts and any(in_flight.values()):
                    continue  # half-open, and its probe is on its way already
                shares, blocked = await self._shares(account, dues, in_flight)
                if account in held_accounts:  # half-open: its probe is the one send
                    shares = self._probe_only(shares)
                for due, n in shares:
                    released += await self._release(conn, due.campaign_id, n, now)
                    touched.add(due.campaign_id)
                for due, capacity in blocked:
                    await self._redate(conn, due, capacity, now)
                    touched.add(due.campaign_id)
            changes = resumed + await refresh_queue_state(conn, touched, self.accounts, now)
            await status_events.record(conn, changes, self.status_topic)
        if released:
            log.info("released %d parked sends of %d campaigns", released, len(touched))
        return released

    async def _due(self, conn: AsyncConnection, now: datetime) -> list[_Due]:
        cur = await conn.execute(
            """
            SELECT d.campaign_id, d.account, d.priority, d.queued_at, d.n,
                   coalesce(c.manager_id, ''), coalesce(c.rate_per_hour, 0),
                   (SELECT s.command FROM parked_sends s  -- one command: the limits it names
                     WHERE s.campaign_id = d.campaign_id AND s.released_at IS NULL LIMIT 1)
            FROM (SELECT campaign_id, account, max(priority) AS priority,
                         min(queued_at) AS queued_at, count(*) AS n
                  FROM parked_sends WHERE released_at IS NULL AND due_at <= %s
                  GROUP BY campaign_id, account) d
            LEFT JOIN campaigns c ON c.campaign_id = d.campaign_id
            WHERE c.status IS NULL OR c.status = 'sending'
            """,
            (now,),
        )
        return [
            _Due(r[0], r[1], r[2], r[3], r[4], r[5], r[6], orjson.loads(bytes(r[7])))
            for r in await cur.fetchall()
        ]

    def _request(self, due: _Due, *, account_only: bool = False) -> LimitRequest | None:
        account = self.accounts.get(due.account)
        if account is None:
            return None
        request = limit_request(account, due.sample, self.clock.time())
        if account_only:  # the limits every campaign of the account shares
            return LimitRequest(**{**request.__dict__, "daily_limit": 0, "campaign_rate": 0,
                                   "domain_group": None, "domain_rate": 0, "priority": None})
        return LimitRequest(**{**request.__dict__, "domain_group": None, "domain_rate": 0})

    async def _in_flight(self, conn: AsyncConnection, account: str, now: datetime) -> dict[str, int]:
        """Sends of `account` released lately whose outcome has not come back, per campaign:
        the limiter may not have counted them yet, so they are not released twice over."""
        cur = await conn.execute(
            """
            SELECT p.campaign_id, count(*) FROM parked_sends p
            JOIN recipients r ON r.send_id = p.send_id
            WHERE p.account = %s AND p.released_at > %s AND r.status = 'deferred'
            GROUP BY p.campaign_id
            """,
            (account, now - IN_FLIGHT_HORIZON),
        )
        return {campaign_id: count for campaign_id, count in await cur.fetchall()}

    async def _shares(
        self, account: str, dues: list[_Due], in_flight: dict[str, int]
    ) -> tuple[list[tuple[_Due, int]], list[tuple[_Due, Capacity]]]:
        """How many sends each campaign may release now, and those a limit blocks."""
        shared = self._request(dues[0], account_only=True)
        if shared is None:  # unknown account: let the sender fail them with unknown_account
            return [(d, d.count) for d in dues], []
        pool_left = min(
            (await self.limiter.capacity(shared)).available - sum(in_flight.values()),
            self.max_per_pass,
        )
        own: dict[str, int] = {}
        blocked: list[tuple[_Due, Capacity]] = []
        for due in dues:
            request = self._request(due)
            assert request is not None
            capacity = await self.limiter.capacity(request)
            if capacity.available <= 0:
                blocked.append((due, capacity))
            own[due.campaign_id] = min(capacity.available - in_flight.get(due.campaign_id, 0), due.count)
        grants: dict[str, int] = defaultdict(int)
        for priority in sorted({d.priority for d in dues}, reverse=True):
            tier = [d for d in dues if d.priority == priority and own[d.campaign_id] > 0]
            self._join(tier)
            while pool_left > 0 and tier:  # one at a time to the least served (fair queuing)
                due = min(tier, key=lambda d: (self.served[d.campaign_id], d.queued_at))
                grants[due.campaign_id] += 1
                self.served[due.campaign_id] += 1
                pool_left -= 1
                if grants[due.campaign_id] >= own[due.campaign_id]:
                    tier.remove(due)
        return [(d, grants[d.campaign_id]) for d in dues if grants[d.campaign_id] > 0], blocked

    def _probe_only(self, shares: list[tuple[_Due, int]]) -> list[tuple[_Due, int]]:
        """One send of the first share: the half-open account breaker's probe."""
        if not shares:
            return []
        first, n = shares[0]
        for due, granted in [(first, n - 1), *shares[1:]]:
            self.served[due.campaign_id] -= granted  # not served after all
        return [(first, 1)]

    def _join(self, tier: list[_Due]) -> None:
        """Campaigns new to the contention start level with the least served one there,
        so equal priorities share from now on; nobody catches up on the past."""
        known = [self.served[d.campaign_id] for d in tier if d.campaign_id in self.served]
        floor = min(known, default=0)
        for due in tier:
            self.served.setdefault(due.campaign_id, floor)

    async def _release(self, conn: AsyncConnection, campaign_id: str, n: int, now: datetime) -> int:
        cur = await conn.execute(
            """
            SELECT send_id::text, command FROM parked_sends
            WHERE campaign_id = %s AND released_at IS NULL AND due_at <= %s
            ORDER BY due_at, parked_at LIMIT %s
            FOR UPDATE SKIP LOCKED
            """,
            (campaign_id, now, n),
        )
        rows = await cur.fetchall()
        if not rows:
            return 0
        messages = []
        for sid, command in rows:
            body = orjson.loads(bytes(command))
            body["message_id"] = new_message_id()
            messages.append((self.send_topic, sid, orjson.dumps(body)))
        await self.producer.produce_all(messages)
        await conn.execute(
            "UPDATE parked_sends SET released_at = %s WHERE send_id = ANY(%s::uuid[])",
            (now, [sid for sid, _ in rows]),
        )
        return len(rows)

    async def _redate(self, conn: AsyncConnection, due: _Due, capacity: Capacity,
                      now: datetime) -> None:
        """Due rows a limit refuses wait for that limit's retry time (moved into the
        working hours), under its reason."""
        account = self.accounts.get(due.account)
        if capacity.reason is None or capacity.retry_at is None or account is None:
            return
        wait = parked_until(capacity.reason, datetime.fromtimestamp(capacity.retry_at, UTC),
                            sending_windows(account, due.sample))
        await conn.execute(
            "UPDATE parked_sends SET reason = %s, due_at = %s"
            " WHERE campaign_id = %s AND released_at IS NULL AND due_at <= %s",
            (wait.reason.value, wait.until, due.campaign_id, now),
        )


#: The texts of a campaign a breaker paused that sends again (English, Russian).
_RESUMED = {
    "closed": ("circuit breaker closed: sending again",
               "Предохранитель закрыт: отправка продолжается"),
    "half_open": ("circuit breaker half-open after its cool-down: one probe send first, the rest "
                  "once it is delivered",
                  "Пауза предохранителя истекла: сначала одна пробная отправка, остальные — "
                  "когда она будет доставлена"),
}


async def resume_held(conn: AsyncConnection) -> list[StatusChange]:
    """Resume the campaigns a circuit breaker paused (not a manager) once the breakers that
    paused them let sends through again: closed (a probe delivered, a cancel, `ops breaker
    reset`) or half-open (the account's probe may go). Issue 14, defect 12."""
    changes = []
    for campaign_id, state in await circuit_breaker.held_campaigns(conn):
        en, ru = _RESUMED[state]
        action = "breaker_closed" if state == "closed" else "breaker_probe"
        change = await change_status(conn, campaign_id, action, ("paused",), "sending",
                                     reason=en, actor="system")
        if change is not None:
            changes.append(replace(change, reason_ru=ru))
    return changes
