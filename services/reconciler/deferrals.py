"""Parked sends and each campaign's queue state (R9), kept in Postgres.

Contract: `park(conn, outcomes)` stores the command of every
`outcome.deferred` in `parked_sends` (one row per send id: a newer deferral
replaces an older one, a replayed older one changes nothing, a released row
comes back only for a newer deferral; nothing of a cancelled campaign is kept).
`release_hold` (resume) makes what a pause or breaker held due, leaving every
other row its own due time; `end_parked` (cancel) ends a campaign's parked rows.
`refresh_queue_state(conn, ids)`
recomputes `defer_reason` / `deferred_until` of sending campaigns from their
parked rows: the reason and due time of the earliest-due unreleased row that
waits for a limit; unchanged while released sends are still in flight; cleared
once no recipient of the campaign waits. Rows parked because the campaign was
paused or its breaker open (`campaign_paused`, `circuit_open`: HELD) only wait
for the campaign to send again, which it does once it is `sending`: they never
make a sending campaign deferred (a resumed campaign goes out at once, and a
late `outcome.deferred` of a send refused during the pause parks its send
without re-deferring the campaign). A quota deferral (`quota_exhausted`,
`quota_unknown`) has no `deferred_until`: it ends when the quota is topped up
or known, not at the next check. A campaign entering a deferral, changing its
reason, or sending again after one gives a `StatusChange` with the manager's
texts in English and Russian (the one catalogue, `reason_texts`); its event is
published unless it repeats what the campaign's last event said
(`status_events.record`). Both run in the caller's transaction and are
idempotent; an unknown reason raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from psycopg import AsyncConnection

from services.pipeline.accounts import Account, Accounts
from services.pipeline.contract import Message
from services.pipeline.defer_reasons import DeferReason, defer_reason
from services.pipeline.working_hours import WorkingHours
from services.reconciler.projections import StatusChange
from services.reconciler.reason_texts import Language, defer_text, hours_text, resumed_text

#: Reasons a send waits for its campaign to send again, not for a limit (see the contract).
HELD = (DeferReason.CAMPAIGN_PAUSED.value, DeferReason.CIRCUIT_OPEN.value)
#: Reasons whose end is not a time: the quota is topped up, or becomes known.
UNTIMED = (DeferReason.QUOTA_EXHAUSTED.value, DeferReason.QUOTA_UNKNOWN.value)


async def park(conn: AsyncConnection, outcomes: Iterable[Message]) -> set[str]:
    """Park the commands of the deferred outcomes; return their campaigns."""
    rows = []
    for o in outcomes:
        if o["kind"] != "outcome.deferred":
            continue
        command = o["command"]
        reason = defer_reason(o["defer_reason"])
        rows.append((
            o["send_id"], o["campaign_id"], o["account"], int(command.get("priority", 5)),
            command.get("queued_at") or command.get("occurred_at") or o["occurred_at"],
            reason.value, o["deferred_until"], orjson.dumps(command), o["occurred_at"],
        ))
    if not rows:
        return set()
    async with conn.cursor() as cur:
        await cur.executemany(
            """
            INSERT INTO parked_sends AS p (send_id, campaign_id, account, priority, queued_at,
                                           reason, due_at, command, parked_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (send_id) DO UPDATE SET
                account = EXCLUDED.account, priority = EXCLUDED.priority,
                reason = EXCLUDED.reason, due_at = EXCLUDED.due_at, command = EXCLUDED.command,
                parked_at = EXCLUDED.parked_at, released_at = NULL
            WHERE p.parked_at < EXCLUDED.parked_at
            """,
            rows,
        )
    campaigns = {r[1] for r in rows}
    # a send of a cancelled campaign (in flight at the cancel, or a replay) waits for nothing
    await conn.execute(
        "DELETE FROM parked_sends p USING campaigns c WHERE c.campaign_id = p.campaign_id"
        " AND c.status = 'cancelled' AND p.released_at IS NULL AND p.campaign_id = ANY(%s)",
        (sorted(campaigns),),
    )
    return campaigns


async def release_hold(conn: AsyncConnection, campaign_id: str, at: str | datetime) -> None:
    """On resume: what the pause (or an open breaker) held is due at `at` at the latest; a retry
    parked for a transient error keeps its own due time, the backoff or the delay the server
    asked for ("try again in 30 seconds"), and a limit's deferral keeps its time too."""
    await conn.execute(
        "UPDATE parked_sends SET due_at = least(due_at, %s::timestamptz) WHERE campaign_id = %s"
        " AND released_at IS NULL AND reason = ANY(%s)",
        (at, campaign_id, list(HELD)),
    )


async def end_parked(conn: AsyncConnection, campaign_id: str) -> int:
    """On cancel: the campaign's parked sends end with it (its recipients are `cancelled`);
    rows already released stay, as the guard against a replay bringing a send back."""
    cur = await conn.execute(
        "DELETE FROM parked_sends WHERE campaign_id = %s AND released_at IS NULL", (campaign_id,)
    )
    return cur.rowcount


#: Each campaign's queue state beside what its parked sends say (add WHERE / ORDER BY):
#: campaign_id, status, defer_reason, deferred_until, the earliest unreleased parked send's
#: reason and due_at (HELD rows left out), and whether any recipient is still deferred.
QUEUE_STATE_SQL = """
    SELECT c.campaign_id, c.status, c.defer_reason, c.deferred_until, e.reason, e.due_at,
           EXISTS (SELECT 1 FROM recipients r
                    WHERE r.campaign_id = c.campaign_id AND r.status = 'deferred')
    FROM campaigns c
    LEFT JOIN LATERAL (
        SELECT p.reason, p.due_at FROM parked_sends p
        WHERE p.campaign_id = c.campaign_id AND p.released_at IS NULL
          AND p.reason NOT IN ('campaign_paused', 'circuit_open')  -- HELD
        ORDER BY p.due_at LIMIT 1
    ) e ON true
"""


def wanted_state(
    status: str, old_reason: str, old_until: datetime | None, reason: str | None,
    due_at: datetime | None, waiting: bool,
) -> tuple[str, datetime | None]:
    """The (defer_reason, deferred_until) a campaign should show (its current one when it stands)."""
    if status != "sending":
        return "", None
    if reason is not None:
        reason = defer_reason(reason).value
        return reason, None if reason in UNTIMED else due_at
    if waiting and old_reason not in HELD:
        return old_reason, old_until  # released sends are on their way: the deferral stands
    return "", None


async def refresh_queue_state(
    conn: AsyncConnection, campaign_ids: Iterable[str], accounts: Accounts | None = None,
    now: datetime | None = None,
) -> list[StatusChange]:
    """Bring the queue state of `campaign_ids` up to date; return the changes to announce.

    `accounts` and `now` (clock time) give the texts their time zone, numbers and
    "today"/"tomorrow"; without them the texts are in UTC and without numbers.
    """
    ids = sorted(set(campaign_ids))
    if not ids:
        return []
    cur = await conn.execute(
        QUEUE_STATE_SQL + " WHERE c.campaign_id = ANY(%s) ORDER BY c.campaign_id FOR UPDATE OF c",
        (ids,),
    )
    changes: list[StatusChange] = []
    for campaign_id, status, old_reason, old_until, reason, due_at, waiting in await cur.fetchall():
        new_reason, new_until = wanted_state(status, old_reason, old_until, reason, due_at, waiting)
        if (new_reason, new_until) == (old_reason, old_until):
            continue
        await conn.execute(
            """
            UPDATE campaigns SET defer_reason = %s, deferred_until = %s,
                   deferred_at = CASE WHEN %s = '' THEN NULL
                                      WHEN defer_reason = '' THEN now() ELSE deferred_at END,
                   updated_at = now()
            WHERE campaign_id = %s
            """,
            (new_reason, new_until, new_reason, campaign_id),
        )
        if new_reason == old_reason:
            continue  # the same deferral re-evaluated: a later `until`, nothing to announce
        texts = await _Texts.load(conn, campaign_id, accounts, now)
        changes.append(_change(campaign_id, status, old_reason, new_reason, new_until, texts))
    return changes


class _Texts:
    """What a campaign's deferral texts need: its account, own rate and working windows."""

    def __init__(self, account: Account | None, rate_per_hour: int, windows: list[WorkingHours],
                 now: datetime) -> None:
        self.account = account
        self.rate_per_hour = rate_per_hour
        self.windows = windows
        self.now = now

    @classmethod
    async def load(cls, conn: AsyncConnection, campaign_id: str, accounts: Accounts | None,
                   now: datetime | None) -> _Texts:
        cur = await conn.execute(
            "SELECT account, rate_per_hour, working_hours FROM campaigns WHERE campaign_id = %s",
            (campaign_id,),
        )
        row = await cur.fetchone()
        account = None if accounts is None or row is None else accounts.get(row[0])
        windows = [] if account is None else campaign_windows(account, row[2] if row else None)
        return cls(account, int(row[1] or 0) if row else 0, windows, now or datetime.now(UTC))

    def defer(self, reason: str, until: datetime | None, lang: Language) -> str:
        time_zone = "UTC" if self.account is None else self.account.time_zone
        numbers = {} if self.account is None else deferral_numbers(
            self.account, reason, self.rate_per_hour, self.windows, lang, self.now)
        return defer_text(reason, lang, until=until, time_zone=time_zone, now=self.now, numbers=numbers)


def campaign_windows(account: Account, working_hours: dict[str, Any] | None) -> list[WorkingHours]:
    """The account's working hours, and the campaign's own when it has some."""
    windows = [account.working_hours]
    if working_hours:
        windows.append(WorkingHours.from_json(working_hours, account.working_hours))
    return windows


def deferral_numbers(
    account: Account, reason: str, rate_per_hour: int, windows: list[WorkingHours], lang: Language,
    now: datetime, sent_today: int | None = None,
) -> dict[str, int | str]:
    """The numbers a deferral text of `reason` names: the limit that binds, the daily limit,
    what was sent today (known from the limiter; at a daily-limit deferral, the limit), the
    working windows."""
    limit = {"campaign_rate": rate_per_hour,
             "daily_limit": account.daily_limit_per_manager}.get(reason, account.hourly_rate)
    numbers: dict[str, int | str] = {
        "limit": limit,
        "daily_limit": account.daily_limit_per_manager,
        "window": ", ".join(hours_text(w, lang, now) for w in windows),
    }
    if sent_today is not None:
        numbers["sent"] = sent_today
    elif reason == DeferReason.DAILY_LIMIT.value:
        numbers["sent"] = limit  # deferred for the daily limit: it is reached
    return numbers


def _change(
    campaign_id: str, status: str, old: str, new: str, until: datetime | None, texts: _Texts
) -> StatusChange:
    if not new:  # the campaign sends again, or was paused, cancelled or completed meanwhile
        again = status == "sending"  # announced: the CRM last read `deferred`
        return StatusChange(
            campaign_id=campaign_id, before="deferred", after=status, actor="system",
            action="deferral_over",
            reason=resumed_text(old, "en") if again else f"{old} deferral over",
            reason_ru=resumed_text(old, "ru") if again else "", announce=again,
        )
    reason = DeferReason(new)
    return StatusChange(
        campaign_id=campaign_id, before="deferred" if old else "sending", after="deferred",
        actor="system", action="defer", reason=texts.defer(reason.value, until, "en"),
        reason_ru=texts.defer(reason.value, until, "ru"),
        defer_reason=reason.value, deferred_until=until,
    )
