"""The suppression list against a real Postgres: adds, removes, hard bounces, replays."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from services.pipeline.contract import Message, envelope, validate
from services.reconciler import suppressions
from tests.support.campaigns import outcome

pytestmark = pytest.mark.integration

Apply = Callable[[psycopg.AsyncConnection, Iterable[Message]], Awaitable[int]]


async def run(url: str, apply: Apply, messages: Iterable[Message]) -> int:
    """`apply(conn, messages)` in one transaction, committed; its count of rows changed."""
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        return await apply(conn, list(messages))


async def reason_of(url: str, email: str) -> str | None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await suppressions.is_suppressed(conn, email)


def add(email: str, reason: str = "unsubscribe", **fields: Any) -> Message:
    return validate(envelope("suppression.add", email=email, reason=reason, **fields))


def remove(email: str, **fields: Any) -> Message:
    return validate(envelope("suppression.remove", email=email, **fields))


async def test_add_is_idempotent_and_normalises_the_address(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    message = add("John.Smith@Example.ORG", source="unsubscribe link", actor_id="unsubscribe-endpoint",
                  occurred_at="2026-03-20T11:42:10.500Z")
    assert await run(database_url, suppressions.apply_suppressions, [message]) == 1
    assert await run(database_url, suppressions.apply_suppressions, [message, message]) == 0
    assert sql("SELECT email, reason, source, suppressed_at FROM suppressions") == [
        ("john.smith@example.org", "unsubscribe", "unsubscribe link",
         datetime(2026, 3, 20, 11, 42, 10, 500000, tzinfo=UTC))]
    for spelling in ("john.smith@example.org", "JOHN.SMITH@EXAMPLE.ORG", "  John.Smith@example.org \t"):
        assert await reason_of(database_url, spelling) == "unsubscribe"
    assert await reason_of(database_url, "jane@example.org") is None

    # the address as a producer that does not validate might send it: blanks and capitals
    raw = {"kind": "suppression.add", "email": "  JANE@Example.org ", "reason": "manual"}
    assert await run(database_url, suppressions.apply_suppressions, [raw]) == 1
    assert await reason_of(database_url, "jane@example.org") == "manual"
    assert sql("SELECT email, source FROM suppressions WHERE reason = 'manual'") == [
        ("jane@example.org", "")]


async def test_a_second_add_updates_reason_and_source_but_keeps_the_first_time(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    first = add("anna@example.com", "unsubscribe", source="link", occurred_at="2026-03-20T09:00:00.000Z")
    second = add("ANNA@example.com", "complaint", source="feedback loop",
                 occurred_at="2026-03-21T09:00:00.000Z")
    assert await run(database_url, suppressions.apply_suppressions, [first]) == 1
    assert await run(database_url, suppressions.apply_suppressions, [second]) == 1
    assert await run(database_url, suppressions.apply_suppressions, [first, second]) == 2  # there and back
    assert await run(database_url, suppressions.apply_suppressions, [second]) == 0
    assert sql("SELECT email, reason, source, suppressed_at FROM suppressions") == [
        ("anna@example.com", "complaint", "feedback loop", datetime(2026, 3, 20, 9, tzinfo=UTC))]


async def test_remove_deletes_and_is_idempotent(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    await run(database_url, suppressions.apply_suppressions,
              [add("anna@example.com"), add("john@example.org", "complaint")])
    assert await run(database_url, suppressions.apply_suppressions,
                     [remove("Anna@Example.com", actor_id="crm-user-17")]) == 1
    assert await run(database_url, suppressions.apply_suppressions, [remove("anna@example.com")]) == 0
    assert await run(database_url, suppressions.apply_suppressions, [remove("nobody@example.com")]) == 0
    assert await reason_of(database_url, "anna@example.com") is None
    assert sql("SELECT email, reason FROM suppressions") == [("john@example.org", "complaint")]


async def test_messages_apply_in_order(database_url: str, sql: Callable[..., list[tuple]]) -> None:
    batch = [add("a@example.com"), remove("a@example.com"), add("A@example.com", "manual"),
             remove("b@example.com"), add("b@example.com", "complaint"),
             validate(envelope("campaign.pause", campaign_id="c1", actor_id="crm-user-17",
                               actor_role="ops"))]  # ignored
    assert await run(database_url, suppressions.apply_suppressions, batch) == 4
    assert sql("SELECT email, reason FROM suppressions ORDER BY email") == [
        ("a@example.com", "manual"), ("b@example.com", "complaint")]


async def test_the_table_refuses_an_unknown_reason(database_url: str) -> None:
    raw = {"kind": "suppression.add", "email": "a@example.com", "reason": "bored"}
    with pytest.raises(psycopg.errors.CheckViolation):
        await run(database_url, suppressions.apply_suppressions, [raw])


async def test_hard_bounces_from_outcomes_are_suppressed(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    long_reply = "5.1.1 <Gone@Example.com>: Recipient address rejected: User unknown in virtual " \
                 "mailbox table; this mailbox was closed years ago and will never come back"
    assert len(long_reply) > 100
    gone = outcome("outcome.failed", "c1", "Gone@Example.com", 550, long_reply, hard_bounce=True,
                   occurred_at="2026-03-20T09:00:02.377Z")
    outcomes = [
        gone,
        outcome("outcome.failed", "c1", "spam@example.com", 554, "5.7.1 Message rejected as spam"),
        outcome("outcome.failed", "c1", "flag-false@example.com", 550, "5.1.1 User unknown",
                hard_bounce=False),
        outcome("outcome.failed", "c1", "busy@example.com", 452, "4.2.2 Mailbox full",
                error_class="transient", hard_bounce=True),
        outcome("outcome.failed", "c1", "template@example.com", None, "",
                error_class="template_error", hard_bounce=True),
        outcome("outcome.sent", "c1", "ok@example.com", 250, "2.0.0 Ok"),
        outcome("outcome.failed", "c1", "left@example.com", 550, "5.1.1 No such user",
                hard_bounce=True),
    ]
    assert await run(database_url, suppressions.suppress_hard_bounces, outcomes) == 2
    assert await run(database_url, suppressions.suppress_hard_bounces, outcomes) == 0  # replay
    assert sql("SELECT email, reason, source FROM suppressions ORDER BY email") == [
        ("gone@example.com", "hard_bounce", f"smtp 550 {long_reply[:100]}"),
        ("left@example.com", "hard_bounce", "smtp 550 5.1.1 No such user"),
    ]
    assert sql("SELECT suppressed_at FROM suppressions WHERE email = 'gone@example.com'") == [
        (datetime(2026, 3, 20, 9, 0, 2, 377000, tzinfo=UTC),)]  # when the outcome happened
    assert await reason_of(database_url, "GONE@example.com ") == "hard_bounce"
    for email in ("spam@example.com", "flag-false@example.com", "busy@example.com", "ok@example.com"):
        assert await reason_of(database_url, email) is None

    # the same address bouncing in another campaign: already on the list, nothing changes
    again = outcome("outcome.failed", "c2", "gone@example.com", 550, "5.1.1 User unknown",
                    hard_bounce=True)
    assert await run(database_url, suppressions.suppress_hard_bounces, [again]) == 0
    assert sql("SELECT source FROM suppressions WHERE email = 'gone@example.com'") == [
        (f"smtp 550 {long_reply[:100]}",)]


async def test_a_hard_bounce_keeps_an_earlier_reason_and_can_be_removed(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    await run(database_url, suppressions.apply_suppressions, [add("anna@example.com", "unsubscribe")])
    bounce = outcome("outcome.failed", "c1", "Anna@Example.com", 550, "5.1.1 User unknown",
                     hard_bounce=True)
    assert await run(database_url, suppressions.suppress_hard_bounces, [bounce]) == 0
    assert await reason_of(database_url, "anna@example.com") == "unsubscribe"

    await run(database_url, suppressions.apply_suppressions, [remove("anna@example.com")])
    assert await run(database_url, suppressions.suppress_hard_bounces, [bounce]) == 1
    assert sql("SELECT reason, source FROM suppressions") == [("hard_bounce", "smtp 550 5.1.1 User unknown")]
    assert await run(database_url, suppressions.apply_suppressions, [remove("anna@example.com")]) == 1
    assert await reason_of(database_url, "anna@example.com") is None
