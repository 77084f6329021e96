"""Writing the Postgres projections from campaign commands and send outcomes.

Contract: every function here runs inside the caller's transaction and is
idempotent: applying the same messages twice leaves the tables as applying
them once. A recipient in a terminal state never moves back; a campaign's
counts are recomputed from its recipients (`refresh_campaigns`), except that
outcomes move them by exactly the recipient status changes they made, read
under those recipients' row locks (`apply_outcomes`), so an outcome batch
costs its own size, not its campaign's. The one exception to "terminal never
moves back": a recipient marked `cancelled` whose send had already gone to
SMTP takes that send's sent, failed or unknown outcome when it lands. Every
status change is returned as a `StatusChange`, which the caller records in
audit_log and announces on the status topic. Chunks follow the planner's rule
(`services/planner/chunks.refusal`): a refused chunk is recorded in
`refused_chunks` and announced, its recipients are not projected. A start or
chunk the ingress refused reaches `apply_commands` as a `REJECTED` entry and is
answered (a start: `rejected`, kept as a `rejected` campaign when its id is new).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from services.pipeline import circuit_breaker
from services.pipeline.accounts import Accounts
from services.pipeline.admission import (
    Admission,
    Admissions,
    RejectedCommand,
    forbidden_texts,
    permitted,
)
from services.pipeline.admission_texts import refusal_texts
from services.pipeline.contract import Message
from services.pipeline.db import CAMPAIGN_LOCK
from services.pipeline.ids import send_id
from services.pipeline.metrics import CAMPAIGN_SECONDS
from services.planner import chunks

TERMINAL = ("sent", "failed", "skipped", "unknown", "cancelled")
OUTCOME_STATUS = {
    "outcome.sent": "sent",
    "outcome.failed": "failed",
    "outcome.skipped": "skipped",
    "outcome.unknown": "unknown",
    "outcome.deferred": "deferred",
}


@dataclass(frozen=True)
class StatusChange:
    """One change of a campaign's status, with who made it and why."""

    campaign_id: str
    before: str | None
    after: str
    actor: str
    action: str
    reason: str
    source_message_id: str | None = None
    announce: bool = True  # publish a campaign.status event (False: audit only)
    defer_reason: str = ""  # set when `after` is "deferred"
    deferred_until: datetime | None = None
    event_status: str = ""  # the event's status when it is not `after` (a forbidden command)
    reason_code: str = ""  # why a command was refused, forbidden, or waits for confirmation
    reason_ru: str = ""
    warnings: tuple[dict[str, Any], ...] = ()
    command: str = ""  # the kind of the command a refusal answers, when not the campaign's own change
    correction: bool = False  # the same status again, with counts that changed after its event


async def apply_commands(
    conn: AsyncConnection, commands: Iterable[Message], accounts: Accounts,
    admissions: Admissions | None = None, max_recipients: int = 0,
) -> tuple[list[StatusChange], set[str]]:
    """Apply campaign commands in order; return their status changes and the campaigns touched.

    With `admissions`, a start is admitted first (services/pipeline/admission.py): a
    refused or forbidden one becomes a `refused` campaign that never sends, a large
    one waits as `needs_confirmation`. Without, every start is accepted (projection
    tests). A pause, resume, cancel or confirm whose actor may not act on the
    campaign changes nothing and gives a `forbidden` change. A chunk that would
    bring its campaign above `max_recipients` (0: no maximum) is refused with a
    status event; its recipients are not projected.
    """
    changes: list[StatusChange] = []
    touched: set[str] = set()
    for command in commands:
        touched.add(command["campaign_id"])
        kind = command["kind"]
        if kind == "campaign.start":
            admitted = Admission("accepted") if admissions is None else await admissions.start(conn, command)
            if admitted.command_only:
                changes.extend(await _refused_start(conn, command, admitted))
            else:
                changes.extend(await _start(conn, command, accounts, admitted))
        elif kind == "campaign.recipients":
            changes.extend(await _chunk(conn, command, max_recipients))
        elif kind == REJECTED:
            changes.extend(await _rejected(conn, command["rejected"]))
        elif kind in _TRANSITIONS:
            refused = await forbidden_change(conn, command)
            changes.extend([refused] if refused is not None else await _transition(conn, command))
    return changes, touched


#: An admission decision -> the campaign's status.
_ADMITTED_STATUS = {"accepted": "sending", "needs_confirmation": "needs_confirmation",
                    "refused": "refused", "forbidden": "refused"}


async def _start(
    conn: AsyncConnection, start: Message, accounts: Accounts, admitted: Admission
) -> list[StatusChange]:
    hours = start.get("working_hours")
    status = _ADMITTED_STATUS[admitted.decision]
    reason = admitted.reason or "campaign started"
    cur = await conn.execute("SELECT status FROM campaigns WHERE campaign_id = %s FOR UPDATE",
                             (start["campaign_id"],))
    found = await cur.fetchone()
    before = None if found is None else str(found[0])
    if before not in (None, "rejected"):
        return []  # a replayed start
    # a start rejected before (unreadable) is replaced by the first valid one with its id
    cur = await conn.execute(
        """
        INSERT INTO campaigns (campaign_id, manager_id, name, account, priority, status, status_reason,
                               total_declared, chunks_declared, started, started_at, queued_at,
                               rate_per_hour, working_hours, deadline, warnings)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, true, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (campaign_id) DO UPDATE SET
            manager_id = EXCLUDED.manager_id, name = EXCLUDED.name, account = EXCLUDED.account,
            priority = EXCLUDED.priority, status = EXCLUDED.status, status_reason = EXCLUDED.status_reason,
            total_declared = EXCLUDED.total_declared, chunks_declared = EXCLUDED.chunks_declared,
            started = true, started_at = EXCLUDED.started_at, queued_at = EXCLUDED.queued_at,
            rate_per_hour = EXCLUDED.rate_per_hour, working_hours = EXCLUDED.working_hours,
            deadline = EXCLUDED.deadline, warnings = EXCLUDED.warnings, updated_at = now()
        WHERE campaigns.status = 'rejected'
        RETURNING campaign_id
        """,
        (
            start["campaign_id"], start["manager_id"], start.get("name", ""),
            accounts.route(start.get("account"), start["manager_id"]), start.get("priority", 5),
            status, "" if admitted.goes_ahead else reason,
            start["total_recipients"], start["total_chunks"], start["occurred_at"],
            start["occurred_at"], start.get("rate_per_hour", 0),
            None if hours is None else Jsonb(hours), start.get("deadline"), Jsonb(admitted.warnings),
        ),
    )
    if await cur.fetchone() is None:
        return []  # a replayed start
    return [
        StatusChange(
            campaign_id=start["campaign_id"], before=before, after=status,
            actor=start.get("actor_id") or start["manager_id"], action="start",
            reason=reason, source_message_id=start["message_id"],
            event_status="forbidden" if admitted.decision == "forbidden" else "",
            reason_code=admitted.code, reason_ru=admitted.reason_ru, warnings=tuple(admitted.warnings),
        )
    ]


async def forbidden_change(conn: AsyncConnection, command: Message) -> StatusChange | None:
    """A `forbidden` change (audited, announced) when the command's actor may not act on its
    campaign — a manager acts on own campaigns only (R16) — else None. Starts and test emails
    are admitted by `Admissions`; chunks carry no actor; an unknown campaign is not refused here."""
    action = _ACTED.get(command["kind"])
    if action is None:
        return None
    cur = await conn.execute("SELECT manager_id, status FROM campaigns WHERE campaign_id = %s",
                             (command["campaign_id"],))
    row = await cur.fetchone()
    if row is None or permitted(command["actor_id"], command["actor_role"], row[0]):
        return None
    en, ru = forbidden_texts(command["actor_id"], action, row[0])
    return StatusChange(
        campaign_id=command["campaign_id"], before=row[1], after=row[1], actor=command["actor_id"],
        action=f"forbidden_{action}", reason=en, source_message_id=command["message_id"],
        event_status="forbidden", reason_code="forbidden", reason_ru=ru, command=command["kind"],
    )


async def admit_test_emails(
    conn: AsyncConnection, commands: list[Message], admissions: Admissions
) -> list[StatusChange]:
    """Admit each test email (the planner plans only those admitted); a refusal is announced."""
    changes = []
    for command in commands:
        if command["kind"] != "campaign.test_email":
            continue
        admitted = await admissions.test_email(conn, command)
        if admitted.goes_ahead:
            continue
        cur = await conn.execute("SELECT status FROM campaigns WHERE campaign_id = %s",
                                 (command["campaign_id"],))
        row = await cur.fetchone()
        status = row[0] if row else None
        changes.append(StatusChange(
            campaign_id=command["campaign_id"], before=status, after=status or "refused",
            actor=command["actor_id"], action="refuse_test_email", reason=admitted.reason,
            source_message_id=command["message_id"], event_status=admitted.decision,
            reason_code=admitted.code, reason_ru=admitted.reason_ru, command=command["kind"],
        ))
    return changes


#: Commands an actor gives on an existing campaign, and the action they ask for.
_ACTED = {"campaign.pause": "pause", "campaign.resume": "resume", "campaign.cancel": "cancel",
          "campaign.resend": "resend", "campaign.confirm": "confirm"}


class UnknownCampaign(Exception):
    """A recipient chunk of a campaign that was never started (or whose start was refused)."""

    error_type = "unknown_campaign"


async def _chunk(conn: AsyncConnection, chunk: Message, max_recipients: int = 0) -> list[StatusChange]:
    campaign_id = chunk["campaign_id"]
    recipients = chunk["recipients"]
    cur = await conn.execute(
        "SELECT status, coalesce((SELECT sum(recipients) FROM campaign_chunks k"
        " WHERE k.campaign_id = c.campaign_id AND k.chunk_index <> %s), 0)"
        " FROM campaigns c WHERE campaign_id = %s",
        (chunk["chunk_index"], campaign_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise UnknownCampaign(
            f"chunk {chunk['chunk_index']} of campaign {campaign_id!r} arrived but the campaign "
            "was never started"
        )
    status = row[0]
    if status == "rejected":
        raise UnknownCampaign(
            f"chunk {chunk['chunk_index']} of campaign {campaign_id!r} arrived but the campaign's "
            "start was rejected (its status event says why)"
        )
    if status == "refused":
        return []  # refused at start, announced then; the planner dead-letters its chunks
    cur = await conn.execute(
        "SELECT total_declared, chunks_declared FROM campaigns WHERE campaign_id = %s", (campaign_id,))
    declared = await cur.fetchone()
    assert declared is not None
    cur = await conn.execute(
        "SELECT chunk_index, recipients, digest FROM campaign_chunks WHERE campaign_id = %s", (campaign_id,))
    received = {int(r[0]): (int(r[1]), r[2]) for r in await cur.fetchall()}
    chunk_digest = chunks.digest(recipients)
    refused = chunks.refusal(chunk["chunk_index"], len(recipients), chunk_digest,
                             declared_chunks=int(declared[1]), declared_recipients=int(declared[0]),
                             received=received, limit=max_recipients)
    if refused is not None:
        return await _refuse_chunk(conn, campaign_id, status, chunk["chunk_index"], chunk["message_id"],
                                   refused.code, refused.reason, refused.reason_ru)
    cur = await conn.execute(
        "INSERT INTO campaign_chunks (campaign_id, chunk_index, recipients, digest) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING RETURNING chunk_index",
        (campaign_id, chunk["chunk_index"], len(recipients), chunk_digest),
    )
    if await cur.fetchone() is None:
        return []  # a replayed chunk
    await conn.execute(
        """
        INSERT INTO recipients (send_id, campaign_id, email, name, data, status)
        SELECT s, %s, e, n, d,
               CASE WHEN (SELECT status FROM campaigns WHERE campaign_id = %s) = 'cancelled'
                    THEN 'cancelled' ELSE 'pending' END
        FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::jsonb[]) AS t(s, e, n, d)
        ON CONFLICT (send_id) DO NOTHING
        """,
        (
            campaign_id, campaign_id,
            [send_id(campaign_id, r["email"]) for r in recipients],
            [r["email"].strip() for r in recipients],
            [r.get("name", "") or "" for r in recipients],
            [Jsonb(r) for r in recipients],
        ),
    )
    await conn.execute(
        "UPDATE campaigns SET chunks_received = chunks_received + 1, updated_at = now()"
        " WHERE campaign_id = %s",
        (campaign_id,),
    )
    return []


async def _refuse_chunk(conn: AsyncConnection, campaign_id: str, status: str, index: int,
                        message_id: str | None, code: str, en: str, ru: str) -> list[StatusChange]:
    """Record a refused chunk (the last refusal of its index) and announce it once per message;
    the campaign keeps its status."""
    cur = await conn.execute(
        """
        INSERT INTO refused_chunks AS r (campaign_id, chunk_index, reason_code, reason, reason_ru, message_id)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (campaign_id, chunk_index) DO UPDATE SET
            reason_code = EXCLUDED.reason_code, reason = EXCLUDED.reason, reason_ru = EXCLUDED.reason_ru,
            message_id = EXCLUDED.message_id, refused_at = now()
        WHERE r.message_id IS DISTINCT FROM EXCLUDED.message_id OR EXCLUDED.message_id IS NULL
        RETURNING chunk_index
        """,
        (campaign_id, index, code, en, ru, message_id),
    )
    if await cur.fetchone() is None:
        return []  # the same message again: answered once
    return [StatusChange(
        campaign_id=campaign_id, before=status, after=status, actor="system",
        action="refuse_recipients" if code == "recipients_over_limit" else "refuse_chunk", reason=en,
        source_message_id=message_id, reason_code=code, reason_ru=ru, command="campaign.recipients",
    )]


#: The kind of the reconciler's own record of a start or chunk the ingress refused (its
#: `rejected` holds the `RejectedCommand`); never on a topic.
REJECTED = "mailer.rejected_command"


def rejection_message(rejected: RejectedCommand) -> Message:
    """The command batch entry of a start or chunk the ingress refused."""
    return {"kind": REJECTED, "campaign_id": rejected.campaign_id, "rejected": rejected}


async def _rejected(conn: AsyncConnection, rejected: RejectedCommand) -> list[StatusChange]:
    """Answer a start or chunk that cannot be read, whose campaign id can (R7 of issue 14).

    A start: a `rejected` status event with the reason; a campaign unknown so far is kept as
    `rejected` (the poll endpoint answers for it) until a valid start with its id arrives; a
    known campaign keeps its status. A chunk of a known campaign: recorded as refused (the
    campaign says it waits for it), announced with the campaign's status."""
    cur = await conn.execute("SELECT status FROM campaigns WHERE campaign_id = %s FOR UPDATE",
                             (rejected.campaign_id,))
    row = await cur.fetchone()
    status = None if row is None else str(row[0])
    problem = rejected.reason[:1000]
    if rejected.kind == "campaign.recipients":
        if status in (None, "rejected", "refused") or rejected.chunk_index is None:
            return []  # no campaign to wait for it: its dead letters say why
        en, ru = refusal_texts("chunk_invalid", chunk=rejected.chunk_index, problem=problem)
        return await _refuse_chunk(conn, rejected.campaign_id, status, rejected.chunk_index,
                                   rejected.message_id, "chunk_invalid", en, ru)
    en, ru = refusal_texts("invalid_start", problem=problem)
    if rejected.message_id is not None:
        cur = await conn.execute(
            "SELECT 1 FROM audit_log WHERE campaign_id = %s AND source_message_id = %s"
            " AND action = 'reject_start'", (rejected.campaign_id, rejected.message_id))
        if await cur.fetchone() is not None:
            return []  # the same message again: answered once
    if status is None:
        await conn.execute(
            "INSERT INTO campaigns (campaign_id, manager_id, status, status_reason)"
            " VALUES (%s, %s, 'rejected', %s)",
            (rejected.campaign_id, rejected.manager_id, en),
        )
    elif status == "rejected":
        await conn.execute(
            "UPDATE campaigns SET status_reason = %s, updated_at = now() WHERE campaign_id = %s",
            (en, rejected.campaign_id),
        )
    if status in (None, "rejected"):
        await conn.execute(
            """
            INSERT INTO rejected_starts (campaign_id, reason_code, reason, reason_ru) VALUES (%s, %s, %s, %s)
            ON CONFLICT (campaign_id) DO UPDATE SET reason_code = EXCLUDED.reason_code,
                reason = EXCLUDED.reason, reason_ru = EXCLUDED.reason_ru, rejected_at = now()
            """,
            (rejected.campaign_id, "invalid_start", en, ru),
        )
    return [StatusChange(
        campaign_id=rejected.campaign_id, before=status, after=status or "rejected",
        actor=rejected.actor_id or rejected.manager_id or "system", action="reject_start", reason=en,
        source_message_id=rejected.message_id, event_status="rejected", reason_code="invalid_start",
        reason_ru=ru, command="campaign.start",
    )]


async def _refused_start(conn: AsyncConnection, start: Message, admitted: Admission) -> list[StatusChange]:
    """Answer a start that reuses the id of a campaign it may not change (`forbidden`, or
    `campaign_id_reused`): audited and announced once per message; nothing else changes."""
    forbidden = admitted.decision == "forbidden"
    action = "forbidden_start" if forbidden else "refuse_start"
    cur = await conn.execute(
        "SELECT 1 FROM audit_log WHERE campaign_id = %s AND source_message_id = %s AND action = %s",
        (start["campaign_id"], start["message_id"], action))
    if await cur.fetchone() is not None:
        return []  # the same message again: answered once
    cur = await conn.execute("SELECT status FROM campaigns WHERE campaign_id = %s", (start["campaign_id"],))
    row = await cur.fetchone()
    status = None if row is None else str(row[0])
    return [StatusChange(
        campaign_id=start["campaign_id"], before=status, after=status or "rejected", actor=start["actor_id"],
        action=action, reason=admitted.reason, source_message_id=start["message_id"],
        event_status="forbidden" if forbidden else "rejected", reason_code=admitted.code,
        reason_ru=admitted.reason_ru, command=start["kind"],
    )]


# kind → (action, statuses it applies to, status it leads to)
_TRANSITIONS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "campaign.pause": ("pause", ("sending",), "paused"),
    "campaign.resume": ("resume", ("paused",), "sending"),
    "campaign.cancel": ("cancel", ("sending", "paused", "needs_confirmation"), "cancelled"),
    "campaign.confirm": ("confirm", ("needs_confirmation",), "sending"),
}


async def _transition(conn: AsyncConnection, command: Message) -> list[StatusChange]:
    action, from_statuses, to_status = _TRANSITIONS[command["kind"]]
    change = await change_status(
        conn, command["campaign_id"], action, from_statuses, to_status,
        reason=command.get("reason") or f"{action} requested", actor=command["actor_id"],
        source_message_id=command["message_id"],
    )
    if change is not None and action == "confirm":
        await conn.execute(
            "UPDATE command_admissions SET decision = 'accepted' WHERE admission_key = %s"
            " AND decision = 'needs_confirmation'", (f"start:{command['campaign_id']}",),
        )
    if change is not None and action in ("resume", "cancel"):
        from services.reconciler import deferrals  # it builds on this module's StatusChange

        if action == "resume":
            await circuit_breaker.reset(conn, command["campaign_id"])
            # what the pause held goes now; a retry keeps the server's backoff (issue 14, 11)
            await deferrals.release_hold(conn, command["campaign_id"], command["occurred_at"])
        else:  # what only this campaign held ends with it (issue 14, defect 12)
            await circuit_breaker.release_campaign(conn, command["campaign_id"], command["actor_id"])
            await deferrals.end_parked(conn, command["campaign_id"])
    return [] if change is None else [change]


async def change_status(
    conn: AsyncConnection, campaign_id: str, action: str, from_statuses: tuple[str, ...],
    to_status: str, *, reason: str, actor: str, source_message_id: str | None = None,
) -> StatusChange | None:
    """Move a campaign from one of `from_statuses` to `to_status`; None when it was not in one.

    A pause or cancel first waits for the campaign's sends in flight (they hold its
    advisory lock shared while they talk to SMTP, services/sender/claims.py), so every
    send after this commit sees the new status. A cancel ends every recipient not sent
    yet as `cancelled`.
    """
    if to_status in ("paused", "cancelled"):
        await conn.execute(f"SELECT pg_advisory_xact_lock({CAMPAIGN_LOCK})", (campaign_id,))
    cur = await conn.execute(
        """
        UPDATE campaigns c SET status = %s, status_reason = %s, updated_at = now()
        FROM (SELECT campaign_id, status FROM campaigns WHERE campaign_id = %s FOR UPDATE) old
        WHERE c.campaign_id = old.campaign_id AND old.status = ANY(%s)
        RETURNING old.status
        """,
        (to_status, reason, campaign_id, list(from_statuses)),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if to_status == "cancelled":
        await conn.execute(
            "UPDATE recipients SET status = 'cancelled', updated_at = now()"
            " WHERE campaign_id = %s AND status IN ('pending', 'deferred')",
            (campaign_id,),
        )
    return StatusChange(
        campaign_id=campaign_id, before=row[0], after=to_status, actor=actor, action=action,
        reason=reason, source_message_id=source_message_id,
    )


async def pause_open_breakers(conn: AsyncConnection) -> list[StatusChange]:
    """Pause every sending campaign an open circuit breaker covers, with reason circuit_open (R10).

    The senders count the errors and open the breakers as they send
    (services/sender/claims.py) and hold back what an open breaker covers; this
    makes the pause official: status, audit, event. Resume resets the breakers.
    """
    trips = await circuit_breaker.open_trips(conn)
    changes = []
    for campaign_id, reason in await circuit_breaker.campaigns_to_pause(conn, trips):
        change = await change_status(conn, campaign_id, "circuit_open", ("sending",), "paused",
                                     reason=reason, actor="system")
        if change is not None:
            changes.append(change)
    return changes


async def apply_outcomes(conn: AsyncConnection, outcomes: list[Message]) -> set[str]:
    """Record outcomes in send_log and recipients, moving the campaigns' counts by the status
    changes they made; return the campaigns they touch.

    A `duplicate` skip (a redelivered command its claim refused) records nothing:
    the first claim's own outcome says what happened to that send.
    """
    outcomes = [o for o in outcomes if o.get("error_class") != "duplicate"]
    if not outcomes:
        return set()
    await conn.execute(SEND_LOG_ROWS, _columns([
        (
            o["send_id"], o["attempt"], o["campaign_id"], OUTCOME_STATUS[o["kind"]],
            o["is_test"], o["recipient_email"], o["account"], o.get("smtp_code"),
            o.get("smtp_reply", ""), o.get("error_class"), o.get("reason"),
            o.get("message_id_header", ""),
            None if o.get("duration_ms") is None else float(o["duration_ms"]), o["occurred_at"],
        )
        for o in outcomes
    ]))
    rows = [
        (
            o["send_id"], o["campaign_id"], o["recipient_email"], OUTCOME_STATUS[o["kind"]],
            o["attempt"], o.get("smtp_code"), o.get("smtp_reply", ""), o.get("error_class"),
        )
        for o in outcomes
        if not o["is_test"]
    ]
    if rows:
        # lock first, so the upsert's snapshot holds the statuses it changes
        await conn.execute(
            "SELECT 1 FROM recipients WHERE send_id = ANY(%s::uuid[]) ORDER BY send_id FOR UPDATE",
            ([r[0] for r in rows],),
        )
    # one statement for the batch; a send twice in it goes one outcome at a time, in order
    groups = [rows] if len({r[0] for r in rows}) == len(rows) else [[r] for r in rows]
    for group in groups:
        if group:
            cur = await conn.execute(RECIPIENT_ROWS, _columns(group))
            await _move_counts(conn, await cur.fetchall())
    touched = {o["campaign_id"] for o in outcomes if not o["is_test"]}
    sent_at = [o["campaign_id"] for o in outcomes if o["kind"] == "outcome.sent"]
    if sent_at:
        await conn.execute(
            "UPDATE campaigns SET first_sent_at = now()"
            " WHERE campaign_id = ANY(%s) AND first_sent_at IS NULL",
            (sorted(set(sent_at)),),
        )
    return touched


SEND_LOG_ROWS = """
    INSERT INTO send_log (send_id, attempt, campaign_id, outcome, is_test, recipient, account,
                          smtp_code, smtp_reply, error_class, reason, message_id, duration_ms,
                          occurred_at)
    SELECT * FROM unnest(%s::uuid[], %s::int[], %s::text[], %s::text[], %s::bool[], %s::text[],
                         %s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::float8[], %s::timestamptz[])
    ON CONFLICT (send_id, attempt, outcome) DO NOTHING
"""

#: The recipients' upsert; returns (campaign, status before, status after, how many) of the
#: recipients it inserted (before NULL) or moved. A statement's CTEs share one snapshot, so
#: `old` holds the statuses before the upsert.
RECIPIENT_ROWS = """
    WITH incoming (send_id, campaign_id, email, status, attempts, last_code, last_reply,
                   error_class) AS (
        SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::int[],
                             %s::int[], %s::text[], %s::text[])
    ), old AS (
        SELECT r.send_id, r.status FROM recipients r
        WHERE r.send_id IN (SELECT send_id FROM incoming)
    ), new AS (
        INSERT INTO recipients AS r (send_id, campaign_id, email, status, attempts,
                                     last_code, last_reply, error_class)
        SELECT * FROM incoming
        ON CONFLICT (send_id) DO UPDATE SET
            status = EXCLUDED.status,
            attempts = GREATEST(r.attempts, EXCLUDED.attempts),
            last_code = EXCLUDED.last_code,
            last_reply = EXCLUDED.last_reply,
            error_class = EXCLUDED.error_class,
            updated_at = now()
        WHERE r.status NOT IN ('sent', 'failed', 'skipped', 'unknown', 'cancelled')
           -- a send handed to SMTP before its campaign was cancelled tells the truth
           OR (r.status = 'cancelled' AND EXCLUDED.status IN ('sent', 'failed', 'unknown'))
        RETURNING r.send_id, r.campaign_id, r.status
    )
    SELECT new.campaign_id, old.status, new.status, count(*)
    FROM new LEFT JOIN old USING (send_id)
    WHERE old.status IS DISTINCT FROM new.status
    GROUP BY 1, 2, 3
"""

#: A recipient status -> the campaign count it is in.
_COUNTED_IN = {"pending": "pending", "deferred": "pending", "sent": "sent", "failed": "failed",
               "skipped": "skipped", "unknown": "unknown", "cancelled": "cancelled"}
_COUNTS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column (the parameters of an `unnest` insert)."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _move_counts(conn: AsyncConnection, moves: list[tuple[str, str | None, str, int]]) -> None:
    """Move campaign counts by (campaign, status before or None, status after, how many)."""
    deltas: dict[str, dict[str, int]] = {}
    for campaign_id, before, after, n in moves:
        delta = deltas.setdefault(campaign_id, dict.fromkeys(_COUNTS, 0))
        if before is None:
            delta["total"] += n
        else:
            delta[_COUNTED_IN[before]] -= n
        delta[_COUNTED_IN[after]] += n
    if not deltas:
        return
    ids = sorted(deltas)
    await conn.execute(
        "UPDATE campaigns c SET " + ", ".join(f"{k} = c.{k} + d.{k}" for k in _COUNTS)
        + ", updated_at = now() FROM unnest(%s::text[], " + ", ".join("%s::int[]" for _ in _COUNTS)
        + ") AS d (campaign_id, " + ", ".join(_COUNTS) + ") WHERE c.campaign_id = d.campaign_id",
        [ids, *([deltas[i][k] for i in ids] for k in _COUNTS)],
    )


async def refresh_campaigns(
    conn: AsyncConnection, campaign_ids: set[str], *, recount: bool = True
) -> list[StatusChange]:
    """Recompute counts of `campaign_ids` (unless `recount` is False: the counts `apply_outcomes`
    moved are current) and complete those with no recipient left to send."""
    if not campaign_ids:
        return []
    ids = sorted(campaign_ids)
    if recount:
        await _recount(conn, ids)
    cur = await conn.execute(
        """
        UPDATE campaigns SET status = 'completed', status_reason = %s,
                             completed_at = now(), updated_at = now()
        WHERE campaign_id = ANY(%s) AND status = 'sending' AND pending = 0 AND total > 0
          AND chunks_declared > 0 AND chunks_received >= chunks_declared
        RETURNING campaign_id, extract(epoch FROM completed_at - coalesce(started_at, created_at))
        """,
        (_COMPLETED_REASON, ids),
    )
    completed = await cur.fetchall()
    for _, seconds in completed:
        CAMPAIGN_SECONDS.observe(max(float(seconds or 0.0), 0.0))
    return [
        StatusChange(
            campaign_id=row[0], before="sending", after="completed", actor="system",
            action="complete", reason=_COMPLETED_REASON,
        )
        for row in completed
    ]


async def _recount(conn: AsyncConnection, ids: list[str]) -> None:
    """Counts of the campaigns `ids` from their recipients (a scan of each one's recipients)."""
    await conn.execute(
        """
        UPDATE campaigns c SET
            total = s.total, pending = s.pending, sent = s.sent, failed = s.failed,
            skipped = s.skipped, unknown = s.unknown, cancelled = s.cancelled, updated_at = now()
        FROM (
            SELECT campaign_id,
                   count(*) AS total,
                   count(*) FILTER (WHERE status IN ('pending', 'deferred')) AS pending,
                   count(*) FILTER (WHERE status = 'sent') AS sent,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'skipped') AS skipped,
                   count(*) FILTER (WHERE status = 'unknown') AS unknown,
                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled
            FROM recipients WHERE campaign_id = ANY(%s) GROUP BY campaign_id
        ) s
        WHERE c.campaign_id = s.campaign_id
        """,
        (ids,),
    )


_COMPLETED_REASON = "every recipient reached a terminal state"
