"""The dead-letter step: a message no service can accept goes here, with why.

Contract: `dead_letter_message()` builds a `dead_letter` event holding the
reason, the source coordinates and the original key and value (base64, the
first MAX_ORIGINAL_BYTES of each, the reason saying when cut), and
`DeadLetters.send()` produces it and waits for the broker's acknowledgement,
so the offset of the bad message is committed only once its dead letter is
durable. The service then goes on with the next message.
"""

from __future__ import annotations

import base64
import logging

from services.pipeline.contract import Message, encode, envelope
from services.pipeline.metrics import DEAD_LETTERS
from services.pipeline.producer import AsyncProducer
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name

log = logging.getLogger(__name__)


#: Most bytes of a rejected key or value a dead letter keeps: a dead letter must itself fit the
#: broker's message limit (base64 adds a third), or it could never be produced.
MAX_ORIGINAL_BYTES = 256 * 1024


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data[:MAX_ORIGINAL_BYTES]).decode("ascii")


def _truncation_note(key: bytes | None, value: bytes | None) -> str:
    cut = [f"{name} truncated to its first {MAX_ORIGINAL_BYTES} of {len(data)} bytes"
           for name, data in (("original key", key), ("original value", value))
           if data is not None and len(data) > MAX_ORIGINAL_BYTES]
    return f" ({'; '.join(cut)})" if cut else ""


def dead_letter_message(
    *,
    service: str,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    error_type: str,
    campaign_id: str | None = None,
) -> Message:
    """The dead-letter event for one rejected message."""
    return envelope(
        "dead_letter",
        campaign_id=campaign_id,
        service=service,
        source_topic=source_topic,
        source_partition=partition,
        source_offset=offset,
        reason=(reason[:1800] + _truncation_note(key, value))[:2000],
        error_type=error_type,
        original_key_b64=_b64(key),
        original_value_b64=_b64(value) or "",
    )


class DeadLetters:
    """Produces dead letters for one service."""

    def __init__(self, producer: AsyncProducer, settings: Settings, service: str) -> None:
        self._producer = producer
        self._topic = topic_name(Topic.DEAD_LETTERS, settings)
        self._service = service

    async def send(
        self,
        *,
        source_topic: str,
        partition: int | None,
        offset: int | None,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        error_type: str = "invalid_message",
        campaign_id: str | None = None,
    ) -> None:
        """Dead-letter one message and wait until the broker has it."""
        message = dead_letter_message(
            service=self._service, source_topic=source_topic, partition=partition,
            offset=offset, key=key, value=value, reason=reason, error_type=error_type,
            campaign_id=campaign_id,
        )
        log.warning(
            "dead-lettered message from %s[%s]@%s: %s", source_topic, partition, offset, reason,
            extra={"event": "dead_letter", "error_type": error_type, "campaign_id": campaign_id},
        )
        await self._producer.produce(self._topic, encode(message), key)
        DEAD_LETTERS.labels(self._service, error_type).inc()
