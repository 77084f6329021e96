"""The reconcile job: check the projections' invariants, repair what is safe, report the rest.

Contract (R26, R17): `reconcile(conn, status_topic, repair=...)` runs in the
caller's transaction, one run at a time (a transaction-level advisory lock),
and returns a `Report` of `Finding`s. Every check reads the state as the run
found it, before any repair, so a dry run (`repair=False`) reports what a
repairing run would, and changes nothing. The checks:

- `stuck`: a sending campaign with recipients waiting whose latest progress
  (its send_log, `updated_at`, `first_sent_at`) is older than `stuck_after`,
  and that is not deferred to a time still ahead (or to a quota top-up, which
  has no time): reported only.
- `send_log`: a recipient pending, deferred or cancelled whose send_log holds
  a sent, failed or unknown outcome recorded after the recipient last changed
  (the outcome was logged, the recipient's update lost): set to the latest
  such outcome (a failure wins a tie), as `apply_outcomes` would have. A
  recipient sent, failed or unknown with no send_log row of that outcome:
  reported only. A resent recipient (back to pending after its logged
  outcome) is not touched.
- `terminal`: a cancelled campaign with recipients still pending or deferred:
  they become cancelled.
- `counts`: a campaign's counts differ from its recipients: recomputed
  (`projections.refresh_campaigns`).
- `completion`: a sending campaign with every chunk in and every recipient
  terminal: completed by that same refresh. A completed campaign with
  recipients still waiting: reported only (no safe repair).
- `queue_state`: `defer_reason` / `deferred_until` disagree with the parked
  sends (what `deferrals.refresh_queue_state` would set): brought up to date
  by it.
- `announced`: a paused, cancelled or completed campaign whose last
  `campaign.status` event (`status_announcements`) holds other counts or
  another status than the projections (an outcome that landed after the event
  without its correction): a correction event is queued with the counts as the
  run leaves them (`status_events.record`, `correction: true`; a plain event
  of its status when even the status differs). Sending campaigns are not
  compared: their counts move with every outcome and their last event comes
  with their completion; nor is a completed campaign with recipients waiting
  (`completion` reports it, and its status is in question).

Every campaign a repair touched is refreshed too (counts, completion, queue
state), so a repair's consequences land in the same run. The status changes
are audited and queued in the outbox (`status_events.record`); the caller
publishes the outbox after the commit.
Running it twice changes nothing the second time: only the report-only
findings come back. `reconcile_command` is `mailer reconcile`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import psycopg
from confluent_kafka import KafkaException
from psycopg import AsyncConnection

from services.pipeline.accounts import Accounts, load_accounts
from services.pipeline.db import open_pool
from services.pipeline.producer import AsyncProducer, DeliveryError
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.reconciler import deferrals, projections, status_events
from services.reconciler.deferrals import QUEUE_STATE_SQL, wanted_state
from services.reconciler.projections import StatusChange
from services.reconciler.status_events import COUNT_FIELDS

#: Every check, in the order its findings are listed.
CHECKS = ("stuck", "send_log", "terminal", "counts", "completion", "queue_state", "announced")
#: Addresses named in one finding.
EXAMPLES = 5

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('mailer.reconcile', 0))"


@dataclass
class Finding:
    """One anomaly: the check that found it, its campaign, what it is, whether it was repaired."""

    check: str
    campaign_id: str | None
    detail: str
    repaired: bool


@dataclass
class Report:
    """What one run found, and the status changes its repairs made (audited, in the outbox)."""

    findings: list[Finding]
    changes: list[StatusChange] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Finding]:
        """The findings left as they were: report-only ones, or all of a dry run."""
        return [f for f in self.findings if not f.repaired]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "findings": [asdict(f) for f in self.findings],
            "repaired": len(self.findings) - len(self.unrepaired),
            "unrepaired": len(self.unrepaired),
            "status_changes": [
                {"campaign_id": c.campaign_id, "action": c.action, "before": c.before,
                 "after": c.after, "reason": c.reason}
                for c in self.changes
            ],
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()

    def lines(self) -> list[str]:
        """The report for a terminal: one line a finding, then a summary."""
        out = [
            f"{'repaired' if f.repaired else 'open':<9} {f.check:<12} {f.campaign_id or '-'}  {f.detail}"
            for f in self.findings
        ]
        out += [f"changed   {c.campaign_id}: {c.before} -> {c.after} ({c.action})" for c in self.changes]
        if not self.findings:
            return ["no anomalies found", *out]
        open_ = len(self.unrepaired)
        return [*out, f"{len(self.findings)} findings: {len(self.findings) - open_} repaired, {open_} open"]


async def reconcile(
    conn: AsyncConnection, status_topic: str, *, repair: bool = True,
    stuck_after: timedelta = timedelta(minutes=30), now: datetime | None = None,
    accounts: Accounts | None = None,
) -> Report:
    """Check every invariant; repair what is safe when `repair`; report everything found."""
    now = now or datetime.now(UTC)
    await conn.execute(_LOCK)
    findings = await stuck_campaigns(conn, now - stuck_after, now)
    lost = await _lost_outcomes(conn)
    unlogged = await _unlogged(conn)
    campaigns = await _campaign_rows(conn)
    queue = await _queue_state(conn)
    stale = await _stale_announcements(conn, campaigns)

    fixed: set[UUID] = set()
    cancelled: set[str] = set()
    changes: list[StatusChange] = []
    if repair:
        fixed = await _take_logged_outcomes(conn, lost)
        cancelled = await _cancel_waiting(
            conn, [c["campaign_id"] for c in campaigns if _cancelled_waiting(c)])
        await _zero_counts(
            conn, [c["campaign_id"] for c in campaigns if _counts_off(c) and not c["actual"]["total"]])
        refresh = {row[1] for row in lost} | cancelled | {
            c["campaign_id"] for c in campaigns if _counts_off(c) or _ready(c)}
        changes = await projections.refresh_campaigns(conn, refresh)
        changes += await deferrals.refresh_queue_state(conn, refresh | {cid for cid, _ in queue},
                                                       accounts, now)
        # every campaign whose counts or status a repair moved, and those announced stale
        recheck = refresh | {cid for cid, _ in stale}
        changes += await status_events.record(conn, changes, status_topic, recheck=recheck)

    findings += _send_log_findings(lost, fixed, unlogged)
    completed = {c.campaign_id for c in changes if c.action == "complete"}
    findings += _campaign_findings(campaigns, repair, cancelled, completed)
    findings += [Finding("queue_state", cid, detail, repair) for cid, detail in queue]
    findings += [Finding("announced", cid, detail, repair) for cid, detail in stale]
    return Report(findings, changes)


def _send_log_findings(
    lost: list[tuple[Any, ...]], fixed: set[UUID], unlogged: list[tuple[str, str, int, list[str]]]
) -> list[Finding]:
    by_campaign: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in lost:
        by_campaign[row[1]].append(row)
    findings = []
    for campaign_id, rows in sorted(by_campaign.items()):
        outcomes = ", ".join(f"{k} {n}" for k, n in sorted(Counter(r[4] for r in rows).items()))
        findings.append(Finding(
            "send_log", campaign_id,
            f"{len(rows)} recipients pending, deferred or cancelled though send_log holds a later "
            f"outcome ({outcomes}): {_examples(r[2] for r in rows)}",
            all(r[0] in fixed for r in rows),
        ))
    return findings + [
        Finding("send_log", campaign_id, f"{n} recipients {status} with no {status} row in send_log: "
                f"{_examples(emails)}", False)
        for campaign_id, status, n, emails in unlogged
    ]


def _campaign_findings(
    campaigns: list[dict[str, Any]], repair: bool, cancelled: set[str], completed: set[str]
) -> list[Finding]:
    """The `terminal`, `counts` and `completion` findings, in that order."""
    terminal, wrong_counts, completion = [], [], []
    for c in campaigns:
        cid, stored, actual = c["campaign_id"], c["stored"], c["actual"]
        if _cancelled_waiting(c):
            terminal.append(Finding("terminal", cid, f"cancelled with {actual['pending']} recipients "
                                    "still pending or deferred", cid in cancelled))
        if _counts_off(c):
            differ = [k for k in COUNT_FIELDS if stored[k] != actual[k]]
            wrong_counts.append(Finding(
                "counts", cid, "counts say " + " ".join(f"{k}={stored[k]}" for k in differ)
                + ", recipients say " + " ".join(f"{k}={actual[k]}" for k in differ), repair,
            ))
        if _ready(c):
            completion.append(Finding("completion", cid, f"sending, all {c['chunks_declared']} chunks in "
                                      f"and all {actual['total']} recipients terminal", cid in completed))
        elif c["status"] == "completed" and actual["pending"]:
            completion.append(Finding("completion", cid, f"completed with {actual['pending']} recipients "
                                      "still pending or deferred", False))
    return terminal + wrong_counts + completion


async def stuck_campaigns(conn: AsyncConnection, before: datetime, now: datetime) -> list[Finding]:
    """Sending campaigns with recipients waiting, no progress since `before` and no deferral ahead."""
    cur = await conn.execute(
        """
        SELECT c.campaign_id, w.waiting, c.defer_reason, c.deferred_until,
               greatest(c.updated_at, c.first_sent_at, l.last_at) AS progress
        FROM campaigns c
        CROSS JOIN LATERAL (SELECT count(*) AS waiting FROM recipients r
                            WHERE r.campaign_id = c.campaign_id
                              AND r.status IN ('pending', 'deferred')) w
        LEFT JOIN LATERAL (SELECT max(s.occurred_at) AS last_at FROM send_log s
                           WHERE s.campaign_id = c.campaign_id AND NOT s.is_test) l ON true
        WHERE c.status = 'sending' AND w.waiting > 0
          AND greatest(c.updated_at, c.first_sent_at, l.last_at) < %(before)s
          AND NOT (c.defer_reason <> '' AND coalesce(c.deferred_until > %(now)s, true))
        ORDER BY c.campaign_id
        """,
        {"before": before, "now": now},
    )
    findings = []
    for campaign_id, waiting, reason, until, progress in await cur.fetchall():
        idle = int((now - progress).total_seconds() // 60)
        deferral = f"; deferred for {reason}{_until(until)}, no longer ahead" if reason else ""
        findings.append(Finding("stuck", campaign_id, f"{waiting} recipients waiting, no progress for "
                                f"{idle} min (since {progress.isoformat()}){deferral}", False))
    return findings


async def _lost_outcomes(conn: AsyncConnection) -> list[tuple[Any, ...]]:
    """(send_id, campaign, email, status, outcome, attempt, code, reply, error_class) of each
    recipient whose logged outcome came after its last change; the latest such outcome."""
    cur = await conn.execute(
        """
        SELECT DISTINCT ON (r.send_id) r.send_id, r.campaign_id, r.email, r.status,
               l.outcome, l.attempt, l.smtp_code, l.smtp_reply, l.error_class
        FROM recipients r JOIN send_log l ON l.send_id = r.send_id
        WHERE r.status IN ('pending', 'deferred', 'cancelled')
          AND l.outcome IN ('sent', 'failed', 'unknown') AND NOT l.is_test
          AND l.recorded_at > r.updated_at
        ORDER BY r.send_id, l.occurred_at DESC, l.attempt DESC, l.outcome = 'sent'
        """
    )
    return sorted(await cur.fetchall(), key=lambda r: (r[1], r[2]))


async def _unlogged(conn: AsyncConnection) -> list[tuple[str, str, int, list[str]]]:
    cur = await conn.execute(
        """
        SELECT r.campaign_id, r.status, count(*), (array_agg(r.email ORDER BY r.email))[1:%s]
        FROM recipients r
        WHERE r.status IN ('sent', 'failed', 'unknown')
          AND NOT EXISTS (SELECT 1 FROM send_log l WHERE l.send_id = r.send_id
                          AND l.outcome = r.status AND NOT l.is_test)
        GROUP BY r.campaign_id, r.status
        ORDER BY r.campaign_id, r.status
        """,
        (EXAMPLES,),
    )
    return [(row[0], row[1], row[2], list(row[3])) for row in await cur.fetchall()]


async def _campaign_rows(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Each campaign's status, chunks, stored counts and the counts of its recipients."""
    actual = ", ".join([
        "count(r.send_id)",
        "count(*) FILTER (WHERE r.status IN ('pending', 'deferred'))",
        *(f"count(*) FILTER (WHERE r.status = '{k}')" for k in COUNT_FIELDS[2:]),
    ])
    cur = await conn.execute(
        f"""
        SELECT c.campaign_id, c.status, c.chunks_declared, c.chunks_received,
               {", ".join(f"c.{k}" for k in COUNT_FIELDS)}, {actual}
        FROM campaigns c LEFT JOIN recipients r ON r.campaign_id = c.campaign_id
        GROUP BY c.campaign_id
        ORDER BY c.campaign_id
        """
    )
    n = len(COUNT_FIELDS)
    return [
        {
            "campaign_id": row[0], "status": row[1], "chunks_declared": row[2],
            "chunks_received": row[3], "stored": dict(zip(COUNT_FIELDS, row[4:4 + n], strict=True)),
            "actual": dict(zip(COUNT_FIELDS, row[4 + n:], strict=True)),
        }
        for row in await cur.fetchall()
    ]


def _counts_off(c: dict[str, Any]) -> bool:
    return bool(c["stored"] != c["actual"])


def _ready(c: dict[str, Any]) -> bool:
    """A sending campaign `refresh_campaigns` completes: every chunk in, no recipient waiting."""
    return bool(c["status"] == "sending" and c["actual"]["total"] > 0 and c["actual"]["pending"] == 0
                and 0 < c["chunks_declared"] <= c["chunks_received"])


def _cancelled_waiting(c: dict[str, Any]) -> bool:
    return bool(c["status"] == "cancelled" and c["actual"]["pending"] > 0)


async def _queue_state(conn: AsyncConnection) -> list[tuple[str, str]]:
    """(campaign, what is wrong) where `refresh_queue_state` would change the queue state."""
    cur = await conn.execute(
        QUEUE_STATE_SQL + " WHERE c.defer_reason <> '' OR e.reason IS NOT NULL ORDER BY c.campaign_id"
    )
    wrong = []
    for campaign_id, status, old, old_until, reason, due_at, waiting in await cur.fetchall():
        if wanted_state(status, old, old_until, reason, due_at, waiting) == (old, old_until):
            continue
        shown = f"{old}{_until(old_until)}" if old else "no deferral"
        if status != "sending":
            wrong.append((campaign_id, f"{status} but still shows a deferral: {shown}"))
        elif reason is not None:
            wrong.append((campaign_id, f"shows {shown} but its earliest parked send waits for "
                          f"{reason}{_until(due_at)}"))
        elif old in deferrals.HELD:
            wrong.append((campaign_id, f"sending but shows {shown}: what a pause held is no deferral"))
        else:
            wrong.append((campaign_id, f"shows {shown} but nothing is parked and no recipient is deferred"))
    return wrong


async def _stale_announcements(
    conn: AsyncConnection, campaigns: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    """(campaign, what differs) for each settled campaign whose last status event does not
    hold its status and its recipients' counts."""
    last = await status_events.last_announced(conn)
    stale = []
    for c in campaigns:
        said = last.get(c["campaign_id"])
        actual = c["actual"]
        if said is None or c["status"] not in status_events.SETTLED:
            continue
        if c["status"] == "completed" and actual["pending"]:
            continue  # its status is in question (`completion`, report only): nothing to announce
        if (said.status, said.counts) == (c["status"], actual):
            continue
        differ = [k for k in COUNT_FIELDS if said.counts[k] != actual[k]]
        stale.append((c["campaign_id"], (
            f"last status event (sequence {said.sequence}) says {said.status} "
            + " ".join(f"{k}={said.counts[k]}" for k in differ)
            + f", projections say {c['status']} " + " ".join(f"{k}={actual[k]}" for k in differ)
        ).rstrip()))
    return stale


async def _take_logged_outcomes(conn: AsyncConnection, lost: list[tuple[Any, ...]]) -> set[UUID]:
    """Give each recipient of `lost` its logged outcome; the send ids updated."""
    if not lost:
        return set()
    cur = await conn.execute(
        """
        UPDATE recipients r SET status = x.outcome, attempts = greatest(r.attempts, x.attempt),
               last_code = x.code, last_reply = x.reply, error_class = x.error_class, updated_at = now()
        FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::int[], %s::text[], %s::text[])
             AS x(send_id, outcome, attempt, code, reply, error_class)
        WHERE r.send_id = x.send_id AND r.status IN ('pending', 'deferred', 'cancelled')
        RETURNING r.send_id
        """,
        [[row[i] for row in lost] for i in (0, 4, 5, 6, 7, 8)],
    )
    return {row[0] for row in await cur.fetchall()}


async def _cancel_waiting(conn: AsyncConnection, campaign_ids: list[str]) -> set[str]:
    """End the waiting recipients of cancelled campaigns as cancelled; the campaigns changed."""
    if not campaign_ids:
        return set()
    cur = await conn.execute(
        """
        UPDATE recipients r SET status = 'cancelled', updated_at = now()
        FROM campaigns c
        WHERE c.campaign_id = r.campaign_id AND c.status = 'cancelled'
          AND r.campaign_id = ANY(%s) AND r.status IN ('pending', 'deferred')
        RETURNING r.campaign_id
        """,
        (campaign_ids,),
    )
    return {row[0] for row in await cur.fetchall()}


async def _zero_counts(conn: AsyncConnection, campaign_ids: list[str]) -> None:
    """Counts of campaigns without recipients (`refresh_campaigns` skips them) back to zero."""
    if campaign_ids:
        await conn.execute(
            f"UPDATE campaigns SET {', '.join(f'{k} = 0' for k in COUNT_FIELDS)}, updated_at = now()"
            " WHERE campaign_id = ANY(%s)",
            (campaign_ids,),
        )


def _until(at: datetime | None) -> str:
    return "" if at is None else f" until {at.isoformat()}"


def _examples(emails: Any) -> str:
    names = list(emails)
    more = f" and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else ""
    return ", ".join(names[:EXAMPLES]) + more


async def reconcile_command(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer reconcile [--dry-run] [--json] [--stuck-minutes N]`: one run, committed, printed.

    The status events of its repairs are published after the commit (left in the
    outbox for the reconciler when the broker does not take them). Exit status 0
    when nothing is left unrepaired, 1 otherwise.
    """
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn, conn.transaction():
        report = await reconcile(
            conn, topic_name(Topic.CAMPAIGN_STATUS, settings), repair=not args.dry_run,
            stuck_after=timedelta(minutes=args.stuck_minutes), accounts=load_accounts(settings),
        )
    print(report.to_json() if args.json else "\n".join(report.lines()))
    if report.changes:
        try:
            published = await _publish_outbox(settings)
        except (DeliveryError, KafkaException) as exc:
            print(f"mailer: status events left in the outbox for the reconciler: {exc}", file=sys.stderr)
        else:
            print(f"published {published} status events", file=sys.stderr)
    return 1 if report.unrepaired else 0


async def _publish_outbox(settings: Settings) -> int:
    producer = AsyncProducer(settings, client_id="mailer-reconcile", **{"message.timeout.ms": 30000})
    try:
        pool = await open_pool(settings, max_size=1, name="mailer-reconcile")
        try:
            return await status_events.publish_outbox(pool, producer)
        finally:
            await pool.close()
    finally:
        await producer.close()
