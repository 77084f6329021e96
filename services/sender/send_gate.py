"""The gate every send passes before SMTP: working hours, then the shared limiter.

Contract: `SendGate.admit(command)` returns `Admitted` (the limiter reserved
a token for this send; keep the request to refund or report on it) or
`Parked` (reason from the closed set and the clock time the send may be tried
again). It never sleeps and never blocks other sends: the caller parks the
command and goes on. A command whose account is not configured is admitted
without a request, so the send step fails it with `unknown_account`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.pipeline.accounts import Account, Accounts
from services.pipeline.clock import Clock
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import WorkingHours, local_day, next_open_all
from services.sender.rate_limit import Limiter, LimitRequest


@dataclass(frozen=True)
class Admitted:
    """The send may go to SMTP now; `request` holds the tokens it took (None: no account)."""

    request: LimitRequest | None
    account: Account | None
    factor: float = 1.0


@dataclass(frozen=True)
class Parked:
    """The send must wait until `until` (clock time) because of `reason`."""

    reason: DeferReason
    until: datetime


class SendGate:
    """Decides, for one send command, whether it may be sent now."""

    def __init__(self, accounts: Accounts, limiter: Limiter, clock: Clock) -> None:
        self.accounts = accounts
        self.limiter = limiter
        self.clock = clock

    async def admit(self, command: dict[str, Any]) -> Admitted | Parked:
        """Check the windows, then reserve every limit at once."""
        account = self.accounts.get(command["account"])
        if account is None:
            return Admitted(None, None)
        now = self.clock.now()
        windows = sending_windows(account, command)
        opens = next_open_all(windows, now)
        if opens > now:
            return Parked(DeferReason.OUTSIDE_HOURS, opens)
        request = limit_request(account, command, self.clock.time())
        decision = await self.limiter.reserve(request)
        if decision.granted:
            return Admitted(request, account, decision.factor)
        assert decision.reason is not None and decision.retry_at is not None
        return parked_until(
            decision.reason, datetime.fromtimestamp(decision.retry_at, UTC), windows
        )


#: Limits counted per calendar day: when their retry time is outside the working
#: hours they still name the wait (the manager sees "daily limit, back at 09:00").
_DAY_LIMITS = frozenset({DeferReason.DAILY_LIMIT, DeferReason.WARMUP_CAP})


def parked_until(reason: DeferReason, until: datetime, windows: list[WorkingHours]) -> Parked:
    """The wait for a limit that frees at `until`, moved to the next open window if closed then.

    A rate that frees after working hours end waits for the next window, and the
    reason becomes `outside_hours`; a daily limit keeps its reason.
    """
    opens = next_open_all(windows, until)
    if opens <= until:
        return Parked(reason, until)
    return Parked(reason if reason in _DAY_LIMITS else DeferReason.OUTSIDE_HOURS, opens)


def sending_windows(account: Account, command: dict[str, Any]) -> list[WorkingHours]:
    """The account's working hours, and the campaign's own when it has some."""
    windows = [account.working_hours]
    if command.get("working_hours"):
        windows.append(WorkingHours.from_json(command["working_hours"], account.working_hours))
    return windows


def limit_request(account: Account, command: dict[str, Any], now: float) -> LimitRequest:
    """Every limit that applies to one send of `command` through `account`."""
    day, next_midnight = local_day(datetime.fromtimestamp(now, UTC), account.time_zone)
    throttle = account.domain_throttle(command["recipient"]["email"])
    return LimitRequest(
        token_id=f"{command['send_id']}:{command['attempt']}",
        account=account.name,
        account_rate=account.hourly_rate,
        manager_id=command["manager_id"],
        daily_limit=account.daily_limit_per_manager,
        day=day,
        next_day_at=next_midnight.timestamp(),
        campaign_id=command["campaign_id"],
        campaign_rate=int(command.get("rate_per_hour") or 0),
        domain_group=throttle.group if throttle else None,
        domain_rate=throttle.per_hour if throttle else 0,
        warmup_cap=account.warmup.daily_caps[0] if account.warmup else 0,
        quota_enforced=account.quota is not None,
        now=now,
        priority=int(command.get("priority", 5)),
    )
