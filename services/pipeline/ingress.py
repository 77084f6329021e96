"""The ingress step every consumer runs first: decode, validate, or dead-letter.

Contract: `accept(event, topic, dead_letters)` returns the validated message,
or `None` after the raw message has been dead-lettered (and acknowledged by
the broker) with the validation reason. It never raises for bad input.
"""

from __future__ import annotations

from typing import Any

from services.pipeline.contract import InvalidMessage, Message, decode
from services.pipeline.dead_letters import DeadLetters
from services.pipeline.topics import Topic


async def accept(event: Any, topic: Topic, dead_letters: DeadLetters) -> Message | None:
    """The message of faust `event` if it is valid; otherwise dead-letter it."""
    try:
        return decode(event.value, topic)
    except InvalidMessage as exc:
        await reject(event, dead_letters, exc.reason, campaign_id=exc.campaign_id)
        return None


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
