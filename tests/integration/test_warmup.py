"""advance_warmup against a real Postgres (fresh database per test) and a real Redis.

send_log rows are written directly; days are the account's local days
(Europe/Moscow, UTC+3), so rows near UTC midnight test the day boundaries.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
import redis.asyncio as aioredis

from services.pipeline.accounts import Account, Accounts, WarmupPlan
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.working_hours import WorkingHours
from services.reconciler.warmup import advance_warmup

pytestmark = pytest.mark.integration

ACCOUNT_WARMUP_DDL = """
CREATE TABLE account_warmup (
    account     text PRIMARY KEY,
    stage       integer NOT NULL DEFAULT 0 CHECK (stage >= 0),
    stage_day   date NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""

ZONE = "Europe/Moscow"
PLAN = WarmupPlan(daily_caps=(50, 100, 200), max_bounce_ratio=0.05, max_deferral_ratio=0.10,
                  min_daily_volume=20)
DAY1 = date(2026, 3, 16)  # a Monday


def moscow(day: date, hour: int, minute: int = 0) -> datetime:
    """Local wall time in Moscow (UTC+3 all year) as aware UTC."""
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC) - timedelta(hours=3)


def account(name: str, plan: WarmupPlan | None = PLAN) -> Account:
    return Account(name=name, host="127.0.0.1", port=25, tls="none", username="", password=lambda: "",
                   working_hours=WorkingHours.parse("00:00-24:00", "1-7", ZONE), warmup=plan)


@pytest.fixture
def warmup_db(database_url: str) -> str:
    """The test's fresh database (0001 and later migrations) plus account_warmup until 0002 has it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('account_warmup')").fetchone()
        if row is None or row[0] is None:
            conn.execute(ACCOUNT_WARMUP_DDL)
    return database_url


@pytest.fixture
def send_log(warmup_db: str) -> Iterator[Callable[..., None]]:
    """Insert `n` send_log rows of one kind for an account at a time."""
    conn = psycopg.connect(warmup_db, autocommit=True)

    def insert(account: str, at: datetime, outcome: str, n: int = 1, *, error_class: str | None = None,
               reason: str | None = None, is_test: bool = False) -> None:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO send_log (send_id, attempt, campaign_id, outcome, is_test, recipient, account,"
                " error_class, reason, occurred_at) VALUES (%s, 1, 'c1', %s, %s, %s, %s, %s, %s, %s)",
                [(uuid.uuid4(), outcome, is_test, f"r{i}@example.com", account, error_class, reason, at)
                 for i in range(n)],
            )

    yield insert
    conn.close()


@pytest.fixture
def advance(warmup_db: str, redis_client: aioredis.Redis,
            keys: LimiterKeys) -> Callable[[Accounts, datetime], object]:
    async def run(accounts: Accounts, now: datetime) -> dict[str, int]:
        async with await psycopg.AsyncConnection.connect(warmup_db) as conn:
            return await advance_warmup(conn, redis_client, keys, accounts, now)

    return run


def rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return list(conn.execute("SELECT account, stage, stage_day, updated_at FROM account_warmup"
                                 " ORDER BY account").fetchall())


async def cap(redis_client: aioredis.Redis, keys: LimiterKeys, name: str) -> int | None:
    value = await redis_client.get(keys.warmup_cap(name))
    return None if value is None else int(value)


async def test_first_call_starts_at_stage_zero_and_is_idempotent(
    advance: Callable, warmup_db: str, redis_client: aioredis.Redis, keys: LimiterKeys,
    send_log: Callable[..., None],
) -> None:
    accounts = Accounts({"new": account("new"), "plain": account("plain", plan=None)})
    await redis_client.set(keys.warmup_cap("plain"), 5)  # a plan since removed
    # 23:30 UTC of DAY1 is already DAY1 + 1 in Moscow
    now = datetime(2026, 3, 16, 23, 30, tzinfo=UTC)
    assert await advance(accounts, now) == {"new": 50}
    first = rows(warmup_db)
    assert [(a, s, d) for a, s, d, _ in first] == [("new", 0, DAY1 + timedelta(days=1))]
    assert await cap(redis_client, keys, "new") == 50
    assert await cap(redis_client, keys, "plain") is None

    send_log("new", now, "sent", 30)
    assert await advance(accounts, now + timedelta(hours=12)) == {"new": 50}  # same local day
    assert rows(warmup_db) == first

    await redis_client.delete(keys.warmup_cap("new"))  # Redis lost its data
    assert await advance(accounts, now + timedelta(hours=13)) == {"new": 50}
    assert await cap(redis_client, keys, "new") == 50
    assert rows(warmup_db) == first


async def test_steps_up_only_while_bounces_and_deferrals_stay_low(
    advance: Callable, warmup_db: str, redis_client: aioredis.Redis, keys: LimiterKeys,
    send_log: Callable[..., None],
) -> None:
    accounts = Accounts({"a": account("a")})
    assert await advance(accounts, moscow(DAY1, 8)) == {"a": 50}

    # day 1: 40 attempts, 2 hard bounces (5%), 4 deferrals (10%): at the thresholds, step up
    send_log("a", moscow(DAY1, 10), "sent", 34)
    send_log("a", moscow(DAY1, 11), "failed", 2, error_class="permanent")
    send_log("a", moscow(DAY1, 12), "failed", 1, error_class="transient")
    send_log("a", moscow(DAY1, 13), "deferred", 3, reason="transient_error")
    # parked by our own gate: not attempts, not deferrals
    send_log("a", moscow(DAY1, 14), "deferred", 500, reason="warmup_cap")
    send_log("a", moscow(DAY1, 14), "deferred", 50, reason="outside_hours")
    # test sends do not count
    send_log("a", moscow(DAY1, 15), "failed", 40, error_class="permanent", is_test=True)
    day2 = DAY1 + timedelta(days=1)
    assert await advance(accounts, moscow(day2, 0, 5)) == {"a": 100}
    assert await cap(redis_client, keys, "a") == 100
    assert [(s, d) for _, s, d, _ in rows(warmup_db)] == [(1, day2)]
    assert await advance(accounts, moscow(day2, 23, 59)) == {"a": 100}  # once per day

    # day 2: 40 attempts with 3 hard bounces (7.5%): hold
    send_log("a", moscow(day2, 10), "sent", 37)
    send_log("a", moscow(day2, 10), "failed", 3, error_class="permanent")
    day3 = day2 + timedelta(days=1)
    assert await advance(accounts, moscow(day3, 9)) == {"a": 100}
    assert [(s, d) for _, s, d, _ in rows(warmup_db)] == [(1, day3)]

    # day 3: 40 attempts with 5 SMTP deferrals (12.5%): hold
    send_log("a", moscow(day3, 10), "sent", 35)
    send_log("a", moscow(day3, 10), "deferred", 5, reason="temporary SMTP failure")
    day4 = day3 + timedelta(days=1)
    assert await advance(accounts, moscow(day4, 9)) == {"a": 100}

    # day 4: clean but only 19 attempts: hold
    send_log("a", moscow(day4, 10), "sent", 19)
    day5 = day4 + timedelta(days=1)
    assert await advance(accounts, moscow(day5, 9)) == {"a": 100}

    # day 5 and 6 clean: up to the last cap, and no further
    send_log("a", moscow(day5, 10), "sent", 20)
    day6 = day5 + timedelta(days=1)
    assert await advance(accounts, moscow(day6, 9)) == {"a": 200}
    send_log("a", moscow(day6, 10), "sent", 200)
    assert await advance(accounts, moscow(day6 + timedelta(days=1), 9)) == {"a": 200}
    assert [s for _, s, _, _ in rows(warmup_db)] == [2]


async def test_judges_the_local_days_since_the_last_step(
    advance: Callable, warmup_db: str, send_log: Callable[..., None],
) -> None:
    accounts = Accounts({"b": account("b")})
    await advance(accounts, moscow(DAY1, 9))
    day3 = DAY1 + timedelta(days=2)
    # hard bounces just outside [DAY1, day3) local: before DAY1 starts, and once day3 has begun
    send_log("b", moscow(DAY1, 0) - timedelta(minutes=1), "failed", 10, error_class="permanent")
    send_log("b", moscow(day3, 0), "failed", 10, error_class="permanent")
    # clean sends inside, on both days (20:59 UTC of the day before DAY1 + 1 is still DAY1 in Moscow)
    send_log("b", moscow(DAY1, 0), "sent", 10)
    send_log("b", moscow(DAY1 + timedelta(days=1), 23, 59), "sent", 10)
    assert await advance(accounts, moscow(day3, 12)) == {"b": 100}  # the job missed a day: one step
    assert [(s, d) for _, s, d, _ in rows(warmup_db)] == [(1, day3)]


async def test_stage_beyond_a_shortened_plan_uses_the_last_cap(
    advance: Callable, warmup_db: str, redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    with psycopg.connect(warmup_db, autocommit=True) as conn:
        conn.execute("INSERT INTO account_warmup (account, stage, stage_day) VALUES ('c', 5, %s)", (DAY1,))
    accounts = Accounts({"c": account("c")})
    assert await advance(accounts, moscow(DAY1, 9)) == {"c": 200}
    assert await cap(redis_client, keys, "c") == 200
