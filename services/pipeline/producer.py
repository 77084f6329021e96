"""One asyncio-friendly Kafka producer (confluent-kafka) for every service.

Contract: `produce()` queues a message and returns an asyncio future that
resolves when the broker has acknowledged it (acks=all, idempotent) and
raises `DeliveryError` when it cannot be delivered. `flush()` waits for every
queued message. A background thread serves delivery reports, so the event
loop never blocks on librdkafka, and hands each poll's reports to the loop in
one wake-up (not one per message). Broker errors go to a `BrokerReporter`
(`error_cb` and `logger` overrides replace it): one line per problem, not
librdkafka's stream of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from services.pipeline.kafka_clients import client_config
from services.pipeline.settings import Settings


class DeliveryError(RuntimeError):
    """The broker did not accept a produced message."""


def producer_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """The librdkafka configuration every service's producer uses (and the benchmarks' raw
    baseline, so that it measures the same producer): the pipeline's client settings
    (services/pipeline/kafka_clients.py), idempotent with acks=all on Kafka and tansu alike."""
    return {
        **client_config(settings, client_id=client_id),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
        "message.timeout.ms": 120000,
    }


class AsyncProducer:
    """A confluent-kafka producer whose deliveries resolve asyncio futures."""

    def __init__(self, settings: Settings, *, client_id: str, **overrides: Any) -> None:
        config = producer_config(settings, client_id)
        config.update(overrides)
        self._producer = Producer(config)
        #: Delivery reports not yet handed to their event loop: (loop, future, error).
        self._reports: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None],
                                   KafkaError | None]] = deque()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name=f"{client_id}-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)
            self._hand_over()
        self._hand_over()

    def _hand_over(self) -> None:
        """Resolve the waiting reports' futures: one call per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Any]]] = {}
        while self._reports:
            loop, future, err = self._reports.popleft()
            batches.setdefault(loop, []).append((future, err))
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve_all, batch)

    def produce(self, topic: str, value: bytes, key: bytes | str | None = None) -> asyncio.Future[None]:
        """Queue one message; the future resolves once the broker has it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            self._reports.append((loop, future, err))

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return future
            except BufferError:
                self._producer.poll(0.05)

    async def produce_all(self, messages: list[tuple[str, bytes | str | None, bytes]]) -> None:
        """Produce (topic, key, value) triples and wait until the broker has all of them.

        One future for the whole batch, resolved by the last delivery report (the first
        error, if any): no future, closure and loop wake-up per message.
        """
        if not messages:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = len(messages)
        errors: list[KafkaError] = []
        lock = threading.Lock()  # reports come from the poller, and from poll() below on BufferError

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            nonlocal pending
            with lock:
                if err is not None:
                    errors.append(err)
                pending -= 1
                last = pending == 0
            if last:
                loop.call_soon_threadsafe(_resolve, done, errors[0] if errors else None)

        for topic, key, value in messages:
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        await done

    async def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued message is delivered (or `timeout` passes)."""
        remaining = await asyncio.get_running_loop().run_in_executor(
            None, self._producer.flush, timeout
        )
        if remaining:
            raise DeliveryError(f"{remaining} messages still undelivered after {timeout}s")

    async def close(self, timeout: float = 60.0) -> None:
        """Flush (at most `timeout` s), then stop the delivery-report thread."""
        try:
            await self.flush(timeout)
        finally:
            self._stop.set()
            self._poller.join(timeout=2)


def _resolve_all(batch: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, err in batch:
        _resolve(future, err)


def _resolve(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(str(err)))
