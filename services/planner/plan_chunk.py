"""The planning step: recipients of one chunk become one send command each.

Contract: `plan()` inserts the send ids of the given recipients into
`planned_sends` and, in the same transaction, produces a `send.email` command
for every id that was not planned before, waits for the broker to acknowledge
all of them, and only then commits. So a replayed chunk or start produces no
second command; a crash before the commit leaves nothing recorded and the
replay produces the same commands again (same send ids, the sender's claim
makes that harmless). Returns how many commands it produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.pipeline.accounts import DEFAULT_ACCOUNT
from services.pipeline.contract import Message, encode, envelope, new_message_id
from services.pipeline.ids import normalize_email, send_id
from services.pipeline.producer import AsyncProducer


def send_command(
    definition: dict[str, Any], recipient: dict[str, Any], sid: str, *, is_test: bool = False
) -> Message:
    """The `send.email` command for one recipient of a campaign definition."""
    command = envelope(
        "send.email",
        campaign_id=definition["campaign_id"],
        send_id=sid,
        manager_id=definition["manager_id"],
        account=definition.get("account") or DEFAULT_ACCOUNT,
        priority=definition.get("priority", 5),
        attempt=1,
        is_test=is_test,
        recipient=recipient,
        template=definition["template"],
        variables=definition.get("variables", {}),
    )
    command["from"] = definition["from"]
    if queued_at := definition.get("queued_at") or definition.get("occurred_at"):
        command["queued_at"] = queued_at  # the campaign's start: orders equal priorities
    for optional in ("reply_to", "unsubscribe_url", "rate_per_hour", "working_hours"):
        if definition.get(optional) is not None:
            command[optional] = definition[optional]
    return command


def unique_recipients(campaign_id: str, recipients: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Recipients by send id; an address repeated within the chunk counts once."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in recipients:
        recipient = dict(r)
        recipient["email"] = r["email"].strip()
        by_id.setdefault(send_id(campaign_id, normalize_email(r["email"])), recipient)
    return by_id


async def plan(
    pool: AsyncConnectionPool,
    producer: AsyncProducer,
    topic: str,
    definition: dict[str, Any],
    recipients: dict[str, dict[str, Any]],
    *,
    is_test: bool = False,
) -> int:
    """Produce the not-yet-planned send commands of `recipients` (send id → recipient)."""
    campaign_id = definition["campaign_id"]
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "INSERT INTO planned_sends (send_id, campaign_id)"
            " SELECT unnest(%s::uuid[]), %s ON CONFLICT (send_id) DO NOTHING RETURNING send_id",
            (list(recipients), campaign_id),
        )
        fresh = [str(row[0]) for row in await cur.fetchall()]
        await producer.produce_all(
            [(topic, sid, value) for sid, value in send_commands(definition, recipients, fresh, is_test)]
        )
    return len(fresh)


def send_commands(definition: dict[str, Any], recipients: dict[str, dict[str, Any]], sids: list[str],
                  is_test: bool) -> Iterator[tuple[str, bytes]]:
    """(send id, encoded `send.email`) of each of `sids`: the command of the first, copied with
    its own message id, send id and recipient (the fields that differ; one `occurred_at`)."""
    if not sids:
        return
    base = send_command(definition, recipients[sids[0]], sids[0], is_test=is_test)
    for sid in sids:
        command = dict(base)
        command["message_id"] = new_message_id()
        command["send_id"] = sid
        command["recipient"] = recipients[sid]
        yield sid, encode(command)
