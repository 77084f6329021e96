"""The ingress step every consumer runs first: decode, validate, or dead-letter.

Contract: `accept(event, topic, dead_letters, check)` returns the validated
message, or `None` after the raw message has been dead-lettered (and
acknowledged by the broker) with the reason: the schema's, or the one
`check(message)` gives for a valid message the service cannot act on
(error_type `invalid_campaign`). It never raises for bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.pipeline.contract import InvalidMessage, Message, decode
from services.pipeline.dead_letters import DeadLetters
from services.pipeline.topics import Topic


async def accept(
    event: Any, topic: Topic, dead_letters: DeadLetters,
    check: Callable[[Message], str | None] | None = None,
) -> Message | None:
    """The message of faust `event` if it is valid; otherwise dead-letter it."""
    try:
        message = decode(event.value, topic)
    except InvalidMessage as exc:
        await reject(event, dead_letters, exc.reason, campaign_id=exc.campaign_id)
        return None
    problem = None if check is None else check(message)
    if problem is not None:
        await reject(event, dead_letters, problem, error_type="invalid_campaign",
                     campaign_id=message.get("campaign_id"))
        return None
    return message


async def reject(
    event: Any,
    dead_letters: DeadLetters,
    reason: str,
    *,
    error_type: str = "invalid_message",
    campaign_id: str | None = None,
) -> None:
    """Dead-letter faust `event` with `reason`."""
    tp = event.message.tp
    await dead_letters.send(
        source_topic=tp.topic,
        partition=tp.partition,
        offset=event.message.offset,
        key=event.key,
        value=event.value,
        reason=reason,
        error_type=error_type,
        campaign_id=campaign_id,
    )
