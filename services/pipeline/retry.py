"""Retrying a unit of work while the infrastructure under it is briefly away.

Contract: `retry_transient(work, what=...)` awaits `work()` and, when it raises
an error that says Postgres or the broker is unreachable (`TRANSIENT_ERRORS`),
logs it and runs `work()` again after a capped exponential backoff, for as long
as it takes. Any other exception propagates at once. Each `work()` must be
idempotent (a transaction that either committed or left nothing behind).
This waits for infrastructure, never for a sending limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
import psycopg_pool
from confluent_kafka import KafkaException

from services.pipeline.producer import DeliveryError

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    DeliveryError,
    KafkaException,
    ConnectionError,
)


async def retry_transient(
    work: Callable[[], Awaitable[T]], *, what: str, max_delay: float = 30.0
) -> T:
    """Run `work` until it succeeds or fails with a non-transient error."""
    delay = 0.5
    attempt = 1
    while True:
        try:
            return await work()
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "%s failed (attempt %d, %s: %s); retrying in %.1fs",
                what, attempt, type(exc).__name__, str(exc).splitlines()[0][:200], delay,
            )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, max_delay)
            attempt += 1
