"""Circuit breakers over consecutive SMTP errors that say the server is in trouble (R10), in Postgres.

Contract: `update_breakers(conn, outcomes, threshold)` walks a batch of
outcomes in order and keeps one counter per campaign and one per SMTP
account in `circuit_breakers`: an error that counts (`is_transient` True)
adds one, a success (False) sets it back to 0 and closes the breaker, anything
else (None) leaves it alone. Only what says the server or the connection is
in trouble counts: connection failures, timeouts, TLS failures, and the
transient replies the reply rules mark so (421, 4.3.x, 4.7.x throttling, …,
services/sender/smtp_replies.py `ReplyRule.breaker`); a reply about one
recipient (450, 4.2.x mailbox states, 4.1.x, greylisting) neither counts nor
resets (issue 14, defect 10). Test emails count for their account only. A
counter reaching `threshold` while its breaker is closed opens it and gives
one `Trip`; further errors keep counting without tripping again. A trip
stands even when a later outcome of the same batch closes the breaker again
(the errors happened; batch boundaries must not decide whether we pause).
Each breaker remembers which campaigns' errors make up its count.

An open account breaker closes by itself (defect 12): after its cool-down
(`configure(cooldown=…)`, MAILER_BREAKER_COOLDOWN) it is half-open: the claim
(`claim_send`, migration 0010) lets exactly one send through as its probe; a
success closes it, an error that counts reopens it with twice the cool-down
(at most `MAX_COOLDOWN`, or the setting when larger). A campaign breaker
waits for the campaign's resume. `campaigns_to_pause(conn, trips)` names the
sending campaigns a trip pauses, with the `circuit_open` reason text;
`open_trips` the breakers open and not yet half-open; `held_campaigns` the
campaigns a breaker paused whose breakers now let a send through (the
reconciler resumes them); `reset(conn, campaign_id)` closes the campaign's and
its account's breakers when it resumes; `release_campaign` is what a cancel
changes (its breaker goes; the account breaker closes when only its errors
opened it, else goes half-open at once); `reset_account` is `mailer ops
breaker reset` (audited in `breaker_audit`); `breaker_state` is what the poll
endpoint shows. Everything runs in the caller's transaction.

Outcomes arrive at least once: a replayed batch counts its errors again (it
may open a breaker a little early). That is accepted, not guarded against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from services.pipeline.contract import Message, iso
from services.pipeline.defer_reasons import DeferReason
from services.sender.smtp_replies import ReplyRules

TRANSIENT_CLASSES = ("transient", "connection", "timeout", "tls")
#: Transport failures: the connection itself is in trouble, whatever the reply (if any) said.
CONNECTION_CLASSES = ("connection", "timeout", "tls")
#: The longest cool-down a reopened account breaker waits (unless the setting is longer).
MAX_COOLDOWN = 3600.0
DEFAULT_COOLDOWN = 300.0

Breaker = tuple[str, str]  # (scope, key): ("campaign", campaign_id) or ("account", account)


@dataclass
class _Policy:
    """What the sender configured: its reply rules (operator rules first) and the cool-down."""

    rules: ReplyRules = field(default_factory=ReplyRules.defaults)
    cooldown: float = DEFAULT_COOLDOWN


_POLICY = _Policy()


def configure(rules: ReplyRules | None = None, cooldown: float | None = None) -> None:
    """Set the reply rules that decide what counts and the account breakers' first cool-down
    (the sender calls it at start with MAILER_REPLY_RULES_FILE and MAILER_BREAKER_COOLDOWN)."""
    if rules is not None:
        _POLICY.rules = rules
    if cooldown is not None:
        _POLICY.cooldown = max(0.0, float(cooldown))


@dataclass(frozen=True)
class Trip:
    """A breaker that opened: its scope and key, its count and the reply that opened it."""

    scope: str  # "campaign" | "account"
    key: str  # campaign id or account name
    consecutive: int
    last_reply: str  # "<code> <reply>" of the error that opened it (or its reason)


def is_transient(outcome: Message, rules: ReplyRules | None = None) -> bool | None:
    """True for an error that says the server is in trouble, False for a success, None for what
    neither counts nor resets (permanent failures, limit deferrals, replies about one recipient)."""
    kind = outcome["kind"]
    if kind == "outcome.sent":
        return False
    if kind == "outcome.deferred":
        if outcome.get("defer_reason") != DeferReason.TRANSIENT_ERROR.value:
            return None
    elif kind == "outcome.failed":
        if outcome.get("error_class") not in TRANSIENT_CLASSES:
            return None
    else:
        return None
    return True if counts_against_server(outcome, rules) else None


def counts_against_server(outcome: Message, rules: ReplyRules | None = None) -> bool:
    """Whether a transient failure says the server or the connection is in trouble."""
    if outcome.get("error_class") in CONNECTION_CLASSES:
        return True
    return (rules or _POLICY.rules).counts_for_breaker(outcome.get("smtp_code"),
                                                       outcome.get("smtp_reply") or "")


def _breakers(outcome: Message) -> list[Breaker]:
    account: Breaker = ("account", outcome["account"])
    if outcome.get("is_test"):
        return [account]
    return [("campaign", outcome["campaign_id"]), account]


#: What closing a breaker writes (a success, a resume, a reset, a cancel).
_CLOSED = (
    "consecutive = 0, opened_at = NULL, campaigns = '{}', cooldown_seconds = NULL,"
    " probe_after = NULL, probe_send = NULL, probe_at = NULL, updated_at = now()"
)

#: A success's whole effect on the breakers (what `update_breakers` does for a batch of
#: successes), as one statement that writes a row only when it has something to reset,
#: so concurrent successful sends neither lock nor rewrite the breaker rows.
RESET_ON_SUCCESS = (
    f"UPDATE circuit_breakers SET {_CLOSED}"
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


@dataclass
class _Row:
    """One breaker row as `update_breakers` changes it."""

    count: int
    opened_at: datetime | None
    campaigns: list[str]
    cooldown: float | None
    probe_after: datetime | None
    probe_send: str | None
    probe_at: datetime | None
    reopened: bool = False


async def update_breakers(
    conn: AsyncConnection, outcomes: Iterable[Message], threshold: int,
    rules: ReplyRules | None = None, cooldown: float | None = None,
) -> list[Trip]:
    """Count the errors that count and the successes of `outcomes` in order; return the
    breakers opened (or reopened by a failed half-open probe)."""
    steps = [(verdict, o) for o in outcomes if (verdict := is_transient(o, rules)) is not None]
    if not steps:
        return []
    if not any(transient for transient, _ in steps):  # successes only: reset what is set
        scopes_keys = [reset_params(o) for _, o in steps]
        await conn.execute(RESET_ON_SUCCESS, ([s for ss, _ in scopes_keys for s in ss],
                                              [k for _, kk in scopes_keys for k in kk]))
        return []
    first_cooldown = _POLICY.cooldown if cooldown is None else cooldown
    keys = sorted({b for _, o in steps for b in _breakers(o)})
    scopes, names = [s for s, _ in keys], [k for _, k in keys]
    await conn.execute(
        "INSERT INTO circuit_breakers (scope, key)"
        " SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
        (scopes, names),
    )
    cur = await conn.execute(
        "SELECT scope, key, consecutive, opened_at, campaigns, cooldown_seconds, probe_after,"
        " probe_send::text, probe_at, now() FROM circuit_breakers"
        " WHERE (scope, key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " ORDER BY scope, key FOR UPDATE",
        (scopes, names),
    )
    rows: dict[Breaker, _Row] = {}
    now = datetime.now().astimezone()
    for s, k, n, opened_at, campaigns, cool, probe_after, probe_send, probe_at, db_now in \
            await cur.fetchall():
        rows[(s, k)] = _Row(n, opened_at, list(campaigns), cool, probe_after, probe_send, probe_at)
        now = db_now
    trips: list[Trip] = []
    for transient, outcome in steps:
        for breaker in _breakers(outcome):
            row = rows[breaker]
            if not transient:
                rows[breaker] = _Row(0, None, [], None, None, None, None)
                continue
            row.count += 1
            if outcome["campaign_id"] not in row.campaigns:
                row.campaigns.append(outcome["campaign_id"])
            half_open = row.opened_at is not None and row.probe_after is not None \
                and row.probe_after <= now
            if row.opened_at is None and row.count >= threshold:
                row.opened_at = now
                if breaker[0] == "account":  # an account breaker closes by a probe later
                    row.cooldown = first_cooldown
                    row.probe_after = now + timedelta(seconds=first_cooldown)
            elif half_open:  # the probe (or a send in flight) met the trouble again: reopen
                row.opened_at, row.reopened = now, True
                row.cooldown = min(2 * (row.cooldown or first_cooldown),
                                   max(MAX_COOLDOWN, first_cooldown))
                row.probe_after = now + timedelta(seconds=row.cooldown)
                row.probe_send = row.probe_at = None
            else:
                continue
            trips.append(Trip(breaker[0], breaker[1], row.count, _last_reply(outcome)))
    async with conn.cursor() as cur:
        await cur.executemany(
            """
            UPDATE circuit_breakers SET consecutive = %s, opened_at = %s, campaigns = %s,
                   cooldown_seconds = %s, probe_after = %s, probe_send = %s::uuid, probe_at = %s,
                   updated_at = now()
            WHERE scope = %s AND key = %s
            """,
            [(r.count, r.opened_at, r.campaigns, r.cooldown, r.probe_after, r.probe_send,
              r.probe_at, *b) for b, r in ((b, rows[b]) for b in keys)],
        )
        reopened = [(b, rows[b]) for b in keys if rows[b].reopened]
        if reopened:
            await cur.executemany(
                "INSERT INTO breaker_audit (scope, key, action, actor, reason, consecutive, opened_at)"
                " VALUES (%s, %s, 'probe_reopened', 'system', %s, %s, %s)",
                [(*b, f"the half-open probe met the trouble again; next probe after "
                       f"{r.cooldown:g} s", r.count, r.opened_at) for b, r in reopened],
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
        f"""
        UPDATE circuit_breakers SET {_CLOSED}
        WHERE (scope = 'campaign' AND key = %s)
           OR (scope = 'account' AND key = (SELECT account FROM campaigns WHERE campaign_id = %s))
        """,
        (campaign_id, campaign_id),
    )


async def release_campaign(conn: AsyncConnection, campaign_id: str, actor: str) -> None:
    """What a cancelled campaign held on the breakers: its own breaker goes; its account's
    breaker forgets its errors, and closes when only they opened it (else it goes half-open at
    once: the next send is its probe). Changes to an open account breaker are audited."""
    await conn.execute("DELETE FROM circuit_breakers WHERE scope = 'campaign' AND key = %s",
                       (campaign_id,))
    cur = await conn.execute(
        "SELECT b.key, b.consecutive, b.opened_at, b.campaigns FROM circuit_breakers b"
        " JOIN campaigns c ON c.account = b.key AND c.campaign_id = %s"
        " WHERE b.scope = 'account' FOR UPDATE OF b",
        (campaign_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return
    account, consecutive, opened_at, campaigns = row
    if set(campaigns) <= {campaign_id}:
        if consecutive == 0 and opened_at is None:
            return
        await conn.execute(f"UPDATE circuit_breakers SET {_CLOSED} WHERE scope = 'account' AND key = %s",
                           (account,))
        action, reason = "closed_by_cancel", f"only campaign {campaign_id}'s errors counted; it was cancelled"
    else:
        await conn.execute(
            "UPDATE circuit_breakers SET campaigns = array_remove(campaigns, %s),"
            " probe_after = CASE WHEN opened_at IS NULL THEN probe_after"
            "                    ELSE least(coalesce(probe_after, now()), now()) END,"
            " updated_at = now() WHERE scope = 'account' AND key = %s",
            (campaign_id, account),
        )
        if opened_at is None:
            return
        action, reason = "half_open_by_cancel", (
            f"campaign {campaign_id} was cancelled; other campaigns' errors counted too: the next"
            " send is the probe")
    if opened_at is not None:
        await _audit(conn, account, action, actor, reason, consecutive, opened_at)


async def reset_account(conn: AsyncConnection, account: str, actor: str, reason: str) -> bool:
    """`mailer ops breaker reset ACCOUNT`: close the account's breaker (audited); False when it
    was closed already (nothing written)."""
    cur = await conn.execute(
        "SELECT consecutive, opened_at FROM circuit_breakers WHERE scope = 'account' AND key = %s"
        " FOR UPDATE",
        (account,),
    )
    row = await cur.fetchone()
    if row is None or (row[0] == 0 and row[1] is None):
        return False
    await conn.execute(f"UPDATE circuit_breakers SET {_CLOSED} WHERE scope = 'account' AND key = %s",
                       (account,))
    await _audit(conn, account, "reset", actor, reason, row[0], row[1])
    return True


async def _audit(conn: AsyncConnection, account: str, action: str, actor: str, reason: str,
                 consecutive: int, opened_at: datetime | None) -> None:
    await conn.execute(
        "INSERT INTO breaker_audit (scope, key, action, actor, reason, consecutive, opened_at)"
        " VALUES ('account', %s, %s, %s, %s, %s, %s)",
        (account, action, actor, reason, consecutive, opened_at),
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
    """Open the account's breaker at once (its credentials were refused: account_stop). It waits
    for a resume or `ops breaker reset`: no probe helps wrong credentials."""
    await conn.execute(
        "INSERT INTO circuit_breakers AS b (scope, key, opened_at) VALUES ('account', %s, now())"
        " ON CONFLICT (scope, key) DO UPDATE SET opened_at = coalesce(b.opened_at, now()),"
        " probe_after = NULL, probe_send = NULL, probe_at = NULL, updated_at = now()",
        (account,),
    )


async def open_trips(conn: AsyncConnection) -> list[Trip]:
    """Every breaker open now and not half-open, as the trips that opened it (for pausing
    what it covers)."""
    cur = await conn.execute(
        "SELECT scope, key, consecutive FROM circuit_breakers WHERE opened_at IS NOT NULL"
        " AND (probe_after IS NULL OR probe_after > now()) ORDER BY scope, key"
    )
    return [Trip(scope, key, consecutive, "") for scope, key, consecutive in await cur.fetchall()]


#: The reason a breaker pause starts with (`reason_text`): what `held_campaigns` looks for.
PAUSE_PREFIX = f"{DeferReason.CIRCUIT_OPEN.value}:"


async def held_campaigns(conn: AsyncConnection) -> list[tuple[str, str]]:
    """(campaign id, "closed" | "half_open") of the campaigns a breaker paused (status reason
    `circuit_open: …`, set by the system) whose own breaker is closed and whose account's
    breaker is closed or half-open: the breaker that held them lets sends through again."""
    cur = await conn.execute(
        """
        SELECT c.campaign_id, CASE WHEN a.opened_at IS NULL THEN 'closed' ELSE 'half_open' END
        FROM campaigns c
        LEFT JOIN circuit_breakers a ON a.scope = 'account' AND a.key = c.account
        WHERE c.status = 'paused' AND c.status_reason LIKE %s
          AND NOT EXISTS (SELECT 1 FROM circuit_breakers b WHERE b.scope = 'campaign'
                          AND b.key = c.campaign_id AND b.opened_at IS NOT NULL)
          AND (a.opened_at IS NULL OR a.probe_after <= now())
        ORDER BY c.campaign_id
        """,
        (PAUSE_PREFIX + "%",),
    )
    return [(campaign_id, state) for campaign_id, state in await cur.fetchall()]


async def held_back(conn: AsyncConnection) -> tuple[dict[str, bool], set[str]]:
    """What open breakers hold back from the release of parked sends: the accounts whose
    breaker is open → whether it lets one probe through now (half-open, no probe in flight),
    and the campaigns whose own breaker is open."""
    cur = await conn.execute(
        """
        SELECT scope, key, scope = 'account' AND probe_after IS NOT NULL AND probe_after <= now()
               AND (probe_send IS NULL OR probe_at < now()
                    - make_interval(secs => greatest(coalesce(cooldown_seconds, 60), 60)))
        FROM circuit_breakers WHERE opened_at IS NOT NULL
        """
    )
    accounts: dict[str, bool] = {}
    campaigns: set[str] = set()
    for scope, key, probe in await cur.fetchall():
        if scope == "account":
            accounts[key] = bool(probe)
        else:
            campaigns.add(key)
    return accounts, campaigns
