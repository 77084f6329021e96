"""Circuit breakers over consecutive transient SMTP errors (R10), kept in Postgres.

Contract: `update_breakers(conn, outcomes, threshold)` walks a batch of
outcomes in order and keeps one counter per campaign and one per SMTP
account in `circuit_breakers`: a transient error (`is_transient` True) adds
one, a success (False) sets it back to 0 and closes the breaker, anything
else (None) leaves it alone. Test emails count for their account only. A
counter reaching `threshold` while its breaker is closed opens it and gives
one `Trip`; further errors keep counting without tripping again. A trip
stands even when a later outcome of the same batch closes the breaker again
(the errors happened; batch boundaries must not decide whether we pause).
`campaigns_to_pause(conn, trips)` names the sending campaigns a trip pauses,
with the `circuit_open` reason text; `reset(conn, campaign_id)` closes the
campaign's and its account's breakers when it resumes; `breaker_state` is
what the poll endpoint shows. Everything runs in the caller's transaction.

Outcomes arrive at least once: a replayed batch counts its errors again (it
may open a breaker a little early). That is accepted, not guarded against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from services.pipeline.contract import Message, iso
from services.pipeline.defer_reasons import DeferReason

TRANSIENT_CLASSES = ("transient", "connection", "timeout", "tls")

Breaker = tuple[str, str]  # (scope, key): ("campaign", campaign_id) or ("account", account)


@dataclass(frozen=True)
class Trip:
    """A breaker that opened: its scope and key, its count and the reply that opened it."""

    scope: str  # "campaign" | "account"
    key: str  # campaign id or account name
    consecutive: int
    last_reply: str  # "<code> <reply>" of the error that opened it (or its reason)


def is_transient(outcome: Message) -> bool | None:
    """True for a transient SMTP error, False for a success, None for what neither counts nor resets."""
    kind = outcome["kind"]
    if kind == "outcome.sent":
        return False
    if kind == "outcome.deferred":
        return True if outcome.get("defer_reason") == DeferReason.TRANSIENT_ERROR.value else None
    if kind == "outcome.failed":
        return True if outcome.get("error_class") in TRANSIENT_CLASSES else None
    return None


def _breakers(outcome: Message) -> list[Breaker]:
    account: Breaker = ("account", outcome["account"])
    if outcome.get("is_test"):
        return [account]
    return [("campaign", outcome["campaign_id"]), account]


#: A success's whole effect on the breakers (what `update_breakers` does for a batch of
#: successes), as one statement that writes a row only when it has something to reset,
#: so concurrent successful sends neither lock nor rewrite the breaker rows.
RESET_ON_SUCCESS = (
    "UPDATE circuit_breakers SET consecutive = 0, opened_at = NULL, updated_at = now()"
    " WHERE (scope, key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
    " AND (consecutive <> 0 OR opened_at IS NOT NULL)"
)


def reset_params(outcome: Message) -> tuple[list[str], list[str]]:
    """The parameters of RESET_ON_SUCCESS for one successful outcome."""
    breakers = _breakers(outcome)
    return [scope for scope, _ in breakers], [key for _, key in breakers]


def _last_reply(outcome: Message) -> str:
    code = outcome.get("smtp_code")
    reply = (outcome.get("smtp_reply") or "").strip()
    text = " ".join(str(part) for part in (code, reply) if part)
    return text or outcome.get("reason") or outcome.get("error_class") or "no reply"


async def update_breakers(
    conn: AsyncConnection, outcomes: Iterable[Message], threshold: int
) -> list[Trip]:
    """Count the transient errors and successes of `outcomes` in order; return the breakers opened."""
    steps = [(verdict, o) for o in outcomes if (verdict := is_transient(o)) is not None]
    if not steps:
        return []
    if not any(transient for transient, _ in steps):  # successes only: reset what is set
        scopes_keys = [reset_params(o) for _, o in steps]
        await conn.execute(RESET_ON_SUCCESS, ([s for ss, _ in scopes_keys for s in ss],
                                              [k for _, kk in scopes_keys for k in kk]))
        return []
    keys = sorted({b for _, o in steps for b in _breakers(o)})
    scopes, names = [s for s, _ in keys], [k for _, k in keys]
    await conn.execute(
        "INSERT INTO circuit_breakers (scope, key)"
        " SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
        (scopes, names),
    )
    cur = await conn.execute(
        "SELECT scope, key, consecutive, opened_at IS NOT NULL FROM circuit_breakers"
        " WHERE (scope, key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " ORDER BY scope, key FOR UPDATE",
        (scopes, names),
    )
    rows = await cur.fetchall()
    counts: dict[Breaker, int] = {(s, k): n for s, k, n, _ in rows}
    is_open: dict[Breaker, bool] = {(s, k): o for s, k, _, o in rows}
    opened_now: set[Breaker] = set()  # opened by this batch (and not closed again since)
    trips: list[Trip] = []
    for transient, outcome in steps:
        for breaker in _breakers(outcome):
            if not transient:
                counts[breaker], is_open[breaker] = 0, False
                opened_now.discard(breaker)
                continue
            counts[breaker] += 1
            if counts[breaker] >= threshold and not is_open[breaker]:
                is_open[breaker] = True
                opened_now.add(breaker)
                trips.append(Trip(breaker[0], breaker[1], counts[breaker], _last_reply(outcome)))
    async with conn.cursor() as cur:
        await cur.executemany(
            """
            UPDATE circuit_breakers SET consecutive = %s, updated_at = now(),
                   opened_at = CASE WHEN NOT %s THEN NULL
                                    WHEN %s THEN now() ELSE opened_at END
            WHERE scope = %s AND key = %s
            """,
            [(counts[b], is_open[b], b in opened_now, *b) for b in keys],
        )
    return trips


async def campaigns_to_pause(conn: AsyncConnection, trips: Iterable[Trip]) -> list[tuple[str, str]]:
    """(campaign id, reason) of every sending campaign the trips pause, each campaign once."""
    pauses: dict[str, str] = {}
    for trip in trips:
        column = "campaign_id" if trip.scope == "campaign" else "account"
        cur = await conn.execute(
            f"SELECT campaign_id FROM campaigns WHERE {column} = %s AND status = 'sending'"
            " ORDER BY campaign_id",
            (trip.key,),
        )
        for (campaign_id,) in await cur.fetchall():
            pauses.setdefault(campaign_id, reason_text(trip))
    return list(pauses.items())


def reason_text(trip: Trip) -> str:
    """The status reason of a campaign paused by `trip`."""
    where = f"on account {trip.key}" if trip.scope == "account" else f"in campaign {trip.key}"
    if trip.consecutive == 0:  # opened at once: the account's credentials were refused
        return f"{DeferReason.CIRCUIT_OPEN.value}: the SMTP server refused the credentials {where}"
    last = f" (last: {trip.last_reply})" if trip.last_reply else ""
    return (
        f"{DeferReason.CIRCUIT_OPEN.value}: {trip.consecutive} consecutive transient SMTP errors"
        f" {where}{last}"
    )


async def reset(conn: AsyncConnection, campaign_id: str) -> None:
    """Close the breakers of `campaign_id` and of its account (on resume)."""
    await conn.execute(
        """
        UPDATE circuit_breakers SET consecutive = 0, opened_at = NULL, updated_at = now()
        WHERE (scope = 'campaign' AND key = %s)
           OR (scope = 'account' AND key = (SELECT account FROM campaigns WHERE campaign_id = %s))
        """,
        (campaign_id, campaign_id),
    )


async def breaker_state(conn: AsyncConnection, campaign_id: str) -> dict[str, dict[str, Any]]:
    """The campaign's and its account's breaker, for the poll endpoint (closed at 0 when unseen)."""
    cur = await conn.execute(
        """
        SELECT b.scope, b.consecutive, b.opened_at FROM circuit_breakers b
        WHERE (b.scope = 'campaign' AND b.key = %s)
           OR (b.scope = 'account' AND b.key = (SELECT account FROM campaigns WHERE campaign_id = %s))
        """,
        (campaign_id, campaign_id),
    )
    state = {"campaign": _view(0, None), "account": _view(0, None)}
    for scope, consecutive, opened_at in await cur.fetchall():
        state[scope] = _view(consecutive, opened_at)
    return state


def _view(consecutive: int, opened_at: datetime | None) -> dict[str, Any]:
    return {
        "consecutive": consecutive,
        "open": opened_at is not None,
        "opened_at": None if opened_at is None else iso(opened_at),
    }


async def open_now(conn: AsyncConnection, account: str) -> None:
    """Open the account's breaker at once (its credentials were refused: account_stop)."""
    await conn.execute(
        "INSERT INTO circuit_breakers AS b (scope, key, opened_at) VALUES ('account', %s, now())"
        " ON CONFLICT (scope, key) DO UPDATE SET opened_at = coalesce(b.opened_at, now()),"
        " updated_at = now()",
        (account,),
    )


async def open_trips(conn: AsyncConnection) -> list[Trip]:
    """Every breaker open now, as the trips that opened it (for pausing what it covers)."""
    cur = await conn.execute(
        "SELECT scope, key, consecutive FROM circuit_breakers WHERE opened_at IS NOT NULL"
        " ORDER BY scope, key"
    )
    return [Trip(scope, key, consecutive, "") for scope, key, consecutive in await cur.fetchall()]
