"""The registry's topics on the broker at start-up (confluent-kafka AdminClient).

Contract: `ensure_topics(settings)` returns once every topic in the registry
exists. With MAILER_TOPICS=create it creates the missing ones with the
registry's partitions and configs (`TopicSpec.configs_for`: with
min.insync.replicas) and the configured replication factor, and leaves existing
ones alone (it never changes partition counts); with MAILER_TOPICS=check it
creates nothing and raises `TopicsError` naming every topic that is missing or
has fewer partitions than the registry's. It waits while the broker does not
answer, up to `timeout` seconds (MAILER_KAFKA_STARTUP_TIMEOUT), then raises
`BrokerUnavailable` with one line naming the address and what to check; a
refused login, a TLS failure or a protocol mismatch raises it at once.
`check_topics(settings)` is the check alone, returning the problems.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from services.pipeline.kafka_clients import client_config
from services.pipeline.kafka_problems import BrokerReporter, BrokerUnavailable
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36

__all__ = ["BrokerUnavailable", "TopicsError", "admin_client", "check_topics", "ensure_topics",
           "wait_for_metadata"]


class TopicsError(RuntimeError):
    """The registry's topics are not as the pipeline needs them; the message names them all."""


def admin_client(settings: Settings, reporter: BrokerReporter | None = None) -> AdminClient:
    """An AdminClient for the configured cluster, its errors going to `reporter`."""
    return AdminClient(client_config(settings, reporter=reporter))


def wait_for_metadata(admin: AdminClient, reporter: BrokerReporter, timeout: float) -> ClusterMetadata:
    """The cluster's metadata, asked again until the broker answers or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            admin.poll(0)
            return metadata
        except KafkaException:
            admin.poll(0)  # serves error_cb and logger: the reporter learns why
        if reporter.fatal:
            raise reporter.unavailable("not retried: waiting cannot cure this")
        if time.monotonic() >= deadline:
            raise reporter.unavailable(f"no answer within {timeout:g} s")
        time.sleep(0.2)


def check_topics(settings: Settings, metadata: ClusterMetadata) -> list[str]:
    """What is wrong with the registry's topics in `metadata`: one entry per topic."""
    problems = []
    for spec in REGISTRY.values():
        name, wanted = spec.name(settings), spec.partitions_for(settings)
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            problems.append(f"{name} is missing (needs {wanted} partition{'s' if wanted != 1 else ''})")
        elif len(topic.partitions) < wanted:
            problems.append(f"{name} has {len(topic.partitions)} partitions, needs {wanted}")
    return problems


def ensure_topics(settings: Settings, timeout: float | None = None, *, mode: str | None = None,
                  reporter: BrokerReporter | None = None) -> list[str]:
    """Make sure every registry topic exists (see the module docstring); return the names created.

    `mode` overrides MAILER_TOPICS (`create` or `check`); `reporter` receives the admin
    client's errors (default: one that logs them).
    """
    mode = mode or settings.topics_mode
    timeout = settings.kafka_startup_timeout if timeout is None else timeout
    reporter = reporter or BrokerReporter(settings)
    admin = admin_client(settings, reporter)
    metadata = wait_for_metadata(admin, reporter, timeout)
    if mode == "check":
        problems = check_topics(settings, metadata)
        if problems:
            raise TopicsError(
                f"MAILER_TOPICS=check: {len(problems)} of {len(REGISTRY)} topics not ready: "
                + "; ".join(problems)
                + " (`mailer topics --print` lists what each needs; MAILER_TOPICS=create creates them)"
            )
        return []
    existing = set(metadata.topics)
    wanted = [
        NewTopic(
            spec.name(settings),
            num_partitions=spec.partitions_for(settings),
            replication_factor=settings.topic_replication_factor,
            config=spec.configs_for(settings),
        )
        for spec in REGISTRY.values()
        if spec.name(settings) not in existing
    ]
    created: list[str] = []
    if not wanted:
        return created
    failures = []
    for name, future in admin.create_topics(wanted, request_timeout=max(timeout, 5.0)).items():
        try:
            future.result()
            created.append(name)
            log.info("created topic %s", name)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != _TOPIC_ALREADY_EXISTS:  # else another service won the race
                failures.append(f"{name}: {error.str()}")
    admin.poll(0)
    if failures:
        if reporter.problem is not None and not created:
            raise reporter.unavailable("topics not created")
        raise TopicsError(
            f"cannot create {len(failures)} topic(s): " + "; ".join(failures)
            + f" (MAILER_TOPIC_REPLICATION_FACTOR={settings.topic_replication_factor}, "
            f"MAILER_TOPIC_MIN_INSYNC_REPLICAS={settings.topic_min_insync_replicas}; topics "
            "managed by a platform team: MAILER_TOPICS=check)"
        )
    return created
