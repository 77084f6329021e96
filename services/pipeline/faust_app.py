"""Builds the faust app of one service, configured the same way for all of them.

Contract: `create_app(service, settings)` returns a faust App on the aiokafka
transport (`kafka://`) whose consumer group is `settings.app_id(service)`, that
reads from the earliest offset when its group has none, keeps no faust tables
(state lives in Postgres), and serves no faust web UI. It connects with the
configured security (services/pipeline/kafka_clients.py), the broker kind's
session timeout and heartbeat (`Settings.session_timeout()`), and on Kafka an
idempotent acks=all producer. `run(app, settings)` creates (or checks) the
registry's topics with confluent-kafka first, so that a broker that cannot be
used ends the process with one line saying why and status 1 before faust
starts; then it runs the worker until SIGTERM or SIGINT, and exits at most
SHUTDOWN_DEADLINE seconds after the signal even when a library hangs in its stop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import logging.config
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.worker import Worker

from services.pipeline.kafka_admin import BrokerUnavailable, TopicsError, ensure_topics
from services.pipeline.kafka_clients import faust_credentials
from services.pipeline.logs import logging_config
from services.pipeline.metrics import serve_metrics
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY, Topic

#: Events a stream may hold unprocessed (faust's default is 4096), and records one poll may
#: turn into objects (aiokafka's default: every record fetched). With a backlog of 100,000
#: send commands the defaults kept 26,000 records in a sender's memory, 35 MiB more than
#: with 10,000, and a reconciler held every chunk of a large campaign (issue 7, the
#: end-to-end benchmark and tracemalloc).
STREAM_BUFFER = 128
MAX_POLL_RECORDS = 500
#: glibc malloc arenas per process (its default is 8 per core): every thread that allocates
#: gets its own and keeps what it once held, which made a reconciler's peak memory grow with
#: the campaign (issue 7). Same as MALLOC_ARENA_MAX=2.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt() parameter (malloc.h)

log = logging.getLogger(__name__)


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at MALLOC_ARENAS before any thread starts; False where the C
    library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


class IdempotentProducer(aiokafka_driver.Producer):
    """faust's aiokafka producer with `enable_idempotence=True` and acks=all.

    faust-streaming 0.15.3 passes `enable_idempotence` to aiokafka only inside an
    exactly_once transaction (`Producer._settings_extra`), and no `producer_*` setting
    reaches it; this subclass returns it from that same hook. The services produce
    through confluent-kafka (services/pipeline/producer.py, idempotent too), so faust's
    producer carries nothing of ours today: this keeps whatever faust may send one day
    free of retry duplicates. Not on tansu: aiokafka's idempotent producer fails there.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class IdempotentTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport (`kafka://`) whose producer is an `IdempotentProducer`."""

    Producer = IdempotentProducer


def create_app(service: str, settings: Settings) -> faust.App:
    """The faust app of `service`."""
    brokers = ";".join(f"kafka://{b}" for b in settings.kafka_bootstrap_servers.split(","))
    app = faust.App(
        settings.app_id(service),
        broker=brokers,
        broker_credentials=faust_credentials(settings),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        broker_session_timeout=settings.session_timeout(),
        broker_heartbeat_interval=settings.heartbeat_interval(),
        broker_commit_interval=settings.broker_commit_interval,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_allow_declare=False,
        web_enabled=False,
        producer_acks=-1,
        stream_buffer_maxsize=STREAM_BUFFER,
        broker_max_poll_records=MAX_POLL_RECORDS,
        datadir=f"/tmp/{settings.app_id(service)}-data",
    )
    if settings.broker_kind == "kafka":
        app.transport = IdempotentTransport(app.conf.broker_consumer, app)
    return app


def faust_topic(app: faust.App, topic: Topic, settings: Settings) -> faust.TopicT:
    """The faust topic object of a registry topic (raw bytes in and out)."""
    spec = REGISTRY[topic]
    return app.topic(
        spec.name(settings),
        partitions=spec.partitions_for(settings),
        key_serializer="raw",
        value_serializer="raw",
    )


def close_on_shutdown(app: faust.App, close: Callable[[], Awaitable[None]]) -> None:
    """Await `close()` when `app` stops, after its consumer has stopped (and committed)."""

    async def receiver(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await close()

    app.on_before_shutdown.connect(receiver)


def run(app: faust.App, settings: Settings, service: str) -> None:
    """Create (or check) topics, then run `app`'s worker in this process until it is stopped,
    logging in the services' one format (services/pipeline/logs.py). When Kafka cannot be
    used or a topic is not ready, log one line saying why and exit with status 1 before
    faust starts."""
    limit_malloc_arenas()
    config = logging_config(service, settings, sys.stderr.isatty())
    logging.config.dictConfig(config)  # the worker applies it again; start-up errors need it now
    try:
        ensure_topics(settings)
    except (BrokerUnavailable, TopicsError) as exc:
        log.error("%s", exc, extra={"event": "startup_failed"})
        raise SystemExit(1) from None
    serve_metrics(settings, service)
    loglevel = {"warning": "warn", "critical": "crit"}.get(settings.log_level, settings.log_level)
    worker = DeadlineWorker(app, loglevel=loglevel, quiet=True, logging_config=config)
    worker.execute_from_commandline()


#: Seconds a stop asked by SIGTERM or SIGINT may take before the process exits anyway.
SHUTDOWN_DEADLINE = 10.0


class DeadlineWorker(Worker):
    """faust's Worker, whose stop on SIGTERM/SIGINT ends the process within SHUTDOWN_DEADLINE.

    With a Kafka broker SIGKILLed, aiokafka's consumer can hang in its own stop (the
    fetcher's request to the dead node is cancelled inside faust's consumer thread, which
    then never finishes: seen in the three-broker test, issue 13). Nothing of ours is lost
    by exiting then: our producers were flushed and closed before (close_on_shutdown),
    every send is claimed in Postgres, and offsets not committed are redelivered and
    answered from the claims.
    """

    def _on_sigterm(self) -> None:
        _exit_after_deadline()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        _exit_after_deadline()
        super()._on_sigint()


def _exit_after_deadline() -> None:
    """Start (once) a daemon timer that exits the process if it is still stopping."""
    global _deadline_timer
    if _deadline_timer is not None:
        return
    _deadline_timer = threading.Timer(SHUTDOWN_DEADLINE, _exit_now)
    _deadline_timer.daemon = True
    _deadline_timer.start()


def _exit_now() -> None:
    log.error("the worker did not stop within %g s of the signal (a Kafka broker unreachable?): "
              "exiting now", SHUTDOWN_DEADLINE, extra={"event": "shutdown_deadline"})
    logging.shutdown()
    os._exit(1)


_deadline_timer: threading.Timer | None = None
