"""Admission: whether a start or a test email may go ahead, decided once for every service (R13-R16).

Contract: `Admissions.start(conn, start)` and `Admissions.test_email(conn, command)`
return the `Admission` of a command. The first service to ask decides, under
the manager's advisory lock, and records the decision in `command_admissions`
in the caller's transaction; every later ask (the other service, a replay)
reads it, so the planner and the reconciler always act alike. A start is, in
this order: `forbidden` when a manager starts another manager's campaign;
`refused` with `template_invalid` when a template does not compile or breaks a
sandbox rule (`template_problem`: syntax, no underscore attribute, no include or
import, a trial render with the campaign's variables that the sandbox refuses),
`refused` above MAILER_MAX_RECIPIENTS, at MAILER_MAX_ACTIVE_CAMPAIGNS active
campaigns of the manager, or beyond MAILER_STARTS_PER_HOUR starts in the
sliding hour; `needs_confirmation` above MAILER_CONFIRM_RECIPIENTS without
`confirmed`; else `accepted`, with warnings (large campaign, quota 0, outside
working hours with the time sending begins). A test email is `forbidden` or
`refused` (an invalid template, or beyond MAILER_TEST_EMAILS_PER_HOUR).
A start whose campaign id was decided before is a replay only when it says the
same (`start_digest`: its content without envelope and actor) and its actor may
act on the recorded campaign; otherwise the answer is for that command only
(`Admission.command_only`), `forbidden` or `refused` with `campaign_id_reused`,
and the campaign keeps its decision. `rejected_command(raw, check)` reads the
campaign id (and chunk index) of a start or chunk the ingress refused, so the
reconciler can answer it. The hourly throttles are sliding
windows in Redis, checked and taken by one Lua call whose member is the
command's key (a replay takes nothing twice); when Redis does not answer they
are skipped (logged, counted): sends stay limited by the sending limiter. The
active-campaign count is Postgres's, which survives a Redis restart.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import SandboxedEnvironment
from prometheus_client import Counter
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.pipeline import input_checks
from services.pipeline.accounts import Accounts
from services.pipeline.admission_texts import refusal_texts, warning
from services.pipeline.clock import Clock
from services.pipeline.contract import InvalidMessage, Message, decode
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic
from services.pipeline.working_hours import WorkingHours, next_open_all
from services.sender.render import TemplateError, render_string, template_variables

log = logging.getLogger(__name__)

ROLES_ON_ALL = ("ops", "admin")
#: Advisory lock class of a manager's admissions (with hashtext(manager_id)).
MANAGER_LOCK = 0x41444D54  # "ADMT"
WINDOW = 3600.0

THROTTLE_ERRORS = Counter(
    "mailer_admission_throttle_errors_total", "Admission throttles skipped because Redis did not answer.",
)

#: KEYS: window. ARGV: now, window seconds, limit, member. Returns {1} taken, or {0, oldest score}.
_THROTTLE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return {1} end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, oldest[2]}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return {1}
"""


@dataclass(frozen=True)
class Admission:
    """The decision on one command: accepted, needs_confirmation, refused or forbidden."""

    decision: str
    code: str = ""
    reason: str = ""  # English
    reason_ru: str = ""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    #: The answer to this command only (a start reusing a decided campaign id): the campaign
    #: keeps its own decision, nothing of it changes.
    command_only: bool = False

    @property
    def goes_ahead(self) -> bool:
        """True when the command is carried out now."""
        return self.decision == "accepted" and not self.command_only


#: Fields of a start that are not its content: the envelope, who sent it, and the account
#: (compared as routed).
_NOT_CONTENT = frozenset({"message_id", "occurred_at", "actor_id", "actor_role", "account"})
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")


def start_digest(start: Mapping[str, Any], account: str) -> str:
    """A digest of what a start asks for (not who sent it or when), `account` as routed."""
    content = {k: v for k, v in start.items() if k not in _NOT_CONTENT}
    content["account"] = account
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


#: A recipient whose data stands in for everyone's in the trial render of a template.
_SAMPLE_RECIPIENT = {"email": "recipient@example.com", "name": "Recipient"}
_TEMPLATE_PARSER = SandboxedEnvironment()
#: Template statements that would read a file (the sandbox has no loader): refused as such.
_FILE_NODES: dict[type[nodes.Node], str] = {
    nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "import", nodes.Extends: "extends",
}
#: Trial-render failures that do not depend on a recipient's data: the template is refused.
_REFUSED_RENDER = ("syntax error", "template error", "template cannot be compiled",
                   "forbidden by the sandbox")


def template_problem(command: Mapping[str, Any]) -> str | None:
    """Why the template parts of a start or test email cannot be used, or None.

    Each part (subject, text, html, unsubscribe_url) must compile, must not name an
    underscore attribute or item (the sandbox refuses them whatever the data) nor include,
    import or extend a file, and must render with the campaign's variables and a sample
    recipient without a sandbox refusal. Failures that depend on a recipient's own data
    (an undefined variable, a division by a recipient's zero) are left to the sender, which
    fails those recipients with `template_error`."""
    template: Mapping[str, Any] = command["template"]
    parts = [("subject", template.get("subject"), False), ("text", template.get("text"), False),
             ("html", template.get("html"), True), ("unsubscribe_url", command.get("unsubscribe_url"), False)]
    sample = {"send_id": "00000000-0000-0000-0000-000000000000", "campaign_id": command["campaign_id"],
              "variables": command.get("variables") or {}, "recipient": _SAMPLE_RECIPIENT}
    variables = template_variables(sample)
    for label, source, html in parts:
        if not isinstance(source, str):
            continue
        problem = _static_template_problem(source)
        if problem is None:
            try:
                render_string(source, variables, html=html)
            except TemplateError as exc:
                problem = exc.reason if exc.reason.startswith(_REFUSED_RENDER) else None
        if problem is not None:
            return f"{label}: {problem}"[:500]
    return None


def _static_template_problem(source: str) -> str | None:
    """A sandbox rule the template breaks whatever the data, or None (compile errors are the
    trial render's to report, with the sender's wording)."""
    try:
        tree = _TEMPLATE_PARSER.parse(source)
    except TemplateSyntaxError:
        return None
    except Exception:  # nested too deeply, too large: the trial render says so
        return None
    for node in tree.find_all(nodes.Node):
        name = _FILE_NODES.get(type(node))
        if name is not None:
            return f"forbidden by the sandbox: {{% {name} %}} reads a file, and templates have none"
        attribute = None
        if isinstance(node, nodes.Getattr):
            attribute = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attribute = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            attribute = node.args[0].value
        if isinstance(attribute, str) and attribute.startswith("_"):
            return f"forbidden by the sandbox: access to attribute {attribute[:64]!r} is not allowed"
    return None


@dataclass(frozen=True)
class RejectedCommand:
    """A start or chunk the ingress refused, whose campaign id can be read."""

    kind: str
    campaign_id: str
    reason: str
    manager_id: str = ""
    actor_id: str = ""
    message_id: str | None = None
    chunk_index: int | None = None


def rejected_command(raw: bytes | None, check: Callable[[Message], str | None] | None = None
                     ) -> RejectedCommand | None:
    """The campaign id (and why) of a `campaign.start` or `campaign.recipients` that the
    ingress refuses, or None: it is valid, or not one of those, or its id cannot be read.
    A message larger than the ingress parses is not read here either."""
    if not isinstance(raw, bytes) or input_checks.size_problem(raw) is not None:
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("kind") not in ("campaign.start", "campaign.recipients"):
        return None
    campaign_id = _readable_id(message.get("campaign_id"))
    if campaign_id is None:
        return None
    try:
        valid = decode(raw, Topic.CAMPAIGN_COMMANDS)
    except InvalidMessage as exc:
        reason = exc.reason
    else:
        found = None if check is None else check(valid)
        if found is None:
            return None
        reason = found
    index = message.get("chunk_index")
    message_id = message.get("message_id")
    return RejectedCommand(
        kind=message["kind"], campaign_id=campaign_id, reason=reason,
        manager_id=_readable_id(message.get("manager_id")) or "",
        actor_id=_readable_id(message.get("actor_id")) or "",
        message_id=message_id if isinstance(message_id, str) and 0 < len(message_id) <= 128 else None,
        chunk_index=index if isinstance(index, int) and not isinstance(index, bool)
        and 0 <= index <= input_checks.MAX_INTEGER else None,
    )


def _readable_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _ID.match(value) else None


def permitted(actor_id: str, actor_role: str, owner: str) -> bool:
    """A manager acts on own campaigns only; ops and admins on all."""
    return actor_role in ROLES_ON_ALL or (actor_role == "manager" and actor_id == owner)


def forbidden_texts(actor_id: str, action: str, owner: str) -> tuple[str, str]:
    """(English, Russian) of a command refused for its actor."""
    return (f"{actor_id} may not {action} a campaign of {owner}: managers act on their own campaigns only.",
            f"{actor_id} не может выполнить «{action}» для кампании менеджера {owner}: "
            "менеджер управляет только своими кампаниями.")


class Admissions:
    """Decides and records admissions; one per service process."""

    def __init__(self, settings: Settings, accounts: Accounts, clock: Clock, redis: Redis) -> None:
        self.settings = settings
        self.accounts = accounts
        self.clock = clock
        self.redis = redis
        self.keys = LimiterKeys(settings.redis_key_prefix)
        self._throttle = redis.register_script(_THROTTLE)

    async def start(self, conn: AsyncConnection, start: Message) -> Admission:
        """The admission of a `campaign.start` (decided once per campaign)."""
        key = f"start:{start['campaign_id']}"
        digest = start_digest(start, self.accounts.route(start.get("account"), start["manager_id"]))
        return await self._once(conn, key, start, self._decide_start, digest)

    async def test_email(self, conn: AsyncConnection, command: Message) -> Admission:
        """The admission of a `campaign.test_email` (decided once per message)."""
        key = f"test_email:{command['message_id']}"
        return await self._once(conn, key, command, self._decide_test_email)

    async def _once(self, conn: AsyncConnection, key: str, command: Message, decide: Any,
                    digest: str | None = None) -> Admission:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                               (MANAGER_LOCK, command["manager_id"]))
            found = await self._recorded(conn, key)
            if found is not None:
                return found if digest is None else await self._replayed(conn, key, command, found, digest)
            admission: Admission = await decide(conn, key, command)
            await conn.execute(
                "INSERT INTO command_admissions (admission_key, campaign_id, manager_id, kind, decision,"
                " reason_code, reason, reason_ru, warnings, content_digest)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (key, command["campaign_id"], command["manager_id"], command["kind"], admission.decision,
                 admission.code, admission.reason, admission.reason_ru, Jsonb(admission.warnings), digest),
            )
        if not admission.goes_ahead:
            log.info("%s of campaign %s: %s (%s)", command["kind"], command["campaign_id"],
                     admission.decision, admission.code,
                     extra={"event": f"admission.{admission.decision}", "campaign_id": command["campaign_id"],
                            "manager_id": command["manager_id"], "reason_code": admission.code})
        return admission

    async def _replayed(self, conn: AsyncConnection, key: str, start: Message, found: Admission,
                        digest: str) -> Admission:
        """The recorded decision when `start` repeats the first start of its campaign id; else the
        answer to this start alone: `forbidden` for an actor who may not act on that campaign,
        `refused` (campaign_id_reused) for other content under the same id."""
        cur = await conn.execute(
            "SELECT manager_id, content_digest FROM command_admissions WHERE admission_key = %s", (key,))
        row = await cur.fetchone()
        owner, recorded = (row[0], row[1]) if row is not None else (start["manager_id"], None)
        answer = None
        if found.decision == "forbidden" and recorded in (None, digest):
            return found  # the forbidden start itself, again (the other service, a replay)
        if not permitted(start["actor_id"], start["actor_role"], owner):
            en, ru = forbidden_texts(start["actor_id"], "start", owner)
            answer = Admission("forbidden", "forbidden", en, ru, command_only=True)
        elif recorded is not None and recorded != digest:
            en, ru = refusal_texts("campaign_id_reused", campaign=start["campaign_id"])
            answer = Admission("refused", "campaign_id_reused", en, ru, command_only=True)
        if answer is None:
            return found
        log.info("campaign.start of campaign %s reusing its id: %s (%s)", start["campaign_id"],
                 answer.decision, answer.code,
                 extra={"event": f"admission.{answer.decision}", "campaign_id": start["campaign_id"],
                        "manager_id": start["manager_id"], "reason_code": answer.code})
        return answer

    async def _recorded(self, conn: AsyncConnection, key: str) -> Admission | None:
        cur = await conn.execute(
            "SELECT decision, reason_code, reason, reason_ru, warnings FROM command_admissions"
            " WHERE admission_key = %s", (key,),
        )
        row = await cur.fetchone()
        return None if row is None else Admission(row[0], row[1], row[2], row[3], list(row[4]))

    async def _decide_start(self, conn: AsyncConnection, key: str, start: Message) -> Admission:
        s, manager = self.settings, start["manager_id"]
        if not permitted(start["actor_id"], start["actor_role"], manager):
            en, ru = forbidden_texts(start["actor_id"], "start", manager)
            return Admission("forbidden", "forbidden", en, ru)
        problem = template_problem(start)
        if problem is not None:
            en, ru = refusal_texts("template_invalid", problem=problem)
            return Admission("refused", "template_invalid", en, ru)
        total = int(start["total_recipients"])
        if total > s.max_campaign_recipients:
            return self._refused("too_many_recipients", total=total, limit=s.max_campaign_recipients)
        active = await self._active_campaigns(conn, manager)
        if active >= s.max_active_campaigns:
            return self._refused("active_campaigns", active=active, limit=s.max_active_campaigns)
        retry_at = await self._take(self.keys.starts(manager), s.starts_per_hour, key)
        if retry_at is not None:
            return self._refused("starts_per_hour", limit=s.starts_per_hour, retry_at=retry_at,
                                 account=self.accounts.route(start.get("account"), manager))
        warnings = await self._warnings(start, total)
        if total > s.confirm_campaign_recipients and not start.get("confirmed"):
            en, ru = refusal_texts("needs_confirmation", total=total, limit=s.confirm_campaign_recipients)
            return Admission("needs_confirmation", "needs_confirmation", en, ru, warnings)
        return Admission("accepted", warnings=warnings)

    async def _decide_test_email(self, conn: AsyncConnection, key: str, command: Message) -> Admission:
        manager = command["manager_id"]
        cur = await conn.execute(
            "SELECT manager_id FROM command_admissions WHERE admission_key = %s",
            (f"start:{command['campaign_id']}",),
        )
        row = await cur.fetchone()
        owner = row[0] if row is not None else manager
        for who in {manager, owner}:
            if not permitted(command["actor_id"], command["actor_role"], who):
                en, ru = forbidden_texts(command["actor_id"], "send a test email of", who)
                return Admission("forbidden", "forbidden", en, ru)
        problem = template_problem(command)
        if problem is not None:
            en, ru = refusal_texts("template_invalid", problem=problem)
            return Admission("refused", "template_invalid", en, ru)
        limit = self.settings.test_emails_per_hour
        retry_at = await self._take(self.keys.test_emails(manager), limit, key)
        if retry_at is not None:
            return self._refused("test_emails_per_hour", limit=limit, retry_at=retry_at,
                                 account=self.accounts.route(command.get("account"), manager))
        return Admission("accepted")

    async def _active_campaigns(self, conn: AsyncConnection, manager: str) -> int:
        cur = await conn.execute(
            """
            SELECT count(*) FROM command_admissions a
            LEFT JOIN campaigns c ON c.campaign_id = a.campaign_id
            WHERE a.manager_id = %s AND a.kind = 'campaign.start'
              AND a.decision IN ('accepted', 'needs_confirmation')
              AND coalesce(c.status, 'sending') NOT IN ('completed', 'cancelled', 'refused')
            """,
            (manager,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _take(self, window: str, limit: int, member: str) -> float | None:
        """Take one slot of a sliding-hour throttle; None when taken, else when one frees (clock s)."""
        if limit <= 0:
            return None
        now = self.clock.time()
        try:
            reply = await self._throttle(keys=[window], args=[now, WINDOW, limit, member])
        except (RedisError, OSError) as exc:
            THROTTLE_ERRORS.inc()
            log.warning("admission throttle skipped, Redis did not answer: %s", type(exc).__name__,
                        extra={"event": "admission.throttle_skipped"})
            return None
        return None if int(reply[0]) == 1 else float(reply[1]) + WINDOW

    def _refused(self, code: str, *, account: str | None = None, retry_at: float | None = None,
                 **numbers: int) -> Admission:
        when = None if retry_at is None else datetime.fromtimestamp(retry_at, UTC)
        zone = self._zone(account)
        en, ru = refusal_texts(code, when=when, time_zone=zone, now=self.clock.now(), **numbers)
        return Admission("refused", code, en, ru)

    def _zone(self, account: str | None) -> str:
        found = self.accounts.get(account) if account else None
        return found.time_zone if found else "UTC"

    async def _warnings(self, start: Message, total: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        account = self.accounts.get(self.accounts.route(start.get("account"), start["manager_id"]))
        if total > self.settings.warn_campaign_recipients:
            found.append(warning("large_campaign", total=total, limit=self.settings.warn_campaign_recipients))
        if account is None:
            return found
        if account.quota is not None:
            try:
                quota = await self.redis.get(self.keys.quota(account.name))
            except (RedisError, OSError):
                quota = None
            if quota is not None and float(quota) <= 0:
                found.append(warning("quota_empty", account=account.name))
        now = self.clock.now()
        windows = [account.working_hours]
        if start.get("working_hours"):
            windows.append(WorkingHours.from_json(start["working_hours"], account.working_hours))
        closed = [w for w in windows if not w.is_open(now)]
        if closed:
            found.append(warning("outside_hours", starts_at=next_open_all(windows, now), now=now,
                                 time_zone=account.time_zone, windows=closed))
        return found
