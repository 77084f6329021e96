"""The registry of every topic of the pipeline: the one place that names them.

Each `TopicSpec` says the topic's name, what its key is, which message kinds
(and so which JSON Schemas in `schemas/`) it carries, its partitions and
configs, who produces to it and who consumes it. `ensure_topics()` creates
them all at start-up (or checks they exist, MAILER_TOPICS=check; `mailer topics
--print` lists them for a platform team); nothing relies on broker auto-creation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from services.pipeline.settings import Settings


class Topic(StrEnum):
    """Logical topic names; the real name is `TopicSpec.name(settings)`."""

    CAMPAIGN_COMMANDS = "mailer.campaign-commands"
    SEND_COMMANDS = "mailer.send-commands"
    SEND_OUTCOMES = "mailer.send-outcomes"
    CAMPAIGN_STATUS = "mailer.campaign-status"
    DEAD_LETTERS = "mailer.dead-letters"
    SUPPRESSIONS = "mailer.suppressions"


@dataclass(frozen=True)
class TopicSpec:
    """What one topic is, who writes it and who reads it."""

    topic: Topic
    key: str
    kinds: tuple[str, ...]
    partitions: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    configs: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def name(self, settings: Settings) -> str:
        """The topic's name on the broker, with the configured prefix."""
        return f"{settings.topic_prefix}{self.topic.value}"

    def partitions_for(self, settings: Settings) -> int:
        """Partitions, honouring settings that override the registry's number."""
        if self.topic is Topic.SEND_COMMANDS:
            return settings.send_commands_partitions
        return self.partitions

    def configs_for(self, settings: Settings) -> dict[str, str]:
        """The topic configs to create it with: the registry's, and min.insync.replicas."""
        return {**self.configs, "min.insync.replicas": str(settings.topic_min_insync_replicas)}


_WEEK_MS = str(7 * 24 * 3600 * 1000)
_MONTH_MS = str(30 * 24 * 3600 * 1000)

REGISTRY: dict[Topic, TopicSpec] = {
    spec.topic: spec
    for spec in (
        TopicSpec(
            topic=Topic.CAMPAIGN_COMMANDS,
            key="campaign_id (so start, chunks, pause, resume and cancel of one campaign keep order)",
            kinds=(
                "campaign.start",
                "campaign.recipients",
                "campaign.pause",
                "campaign.resume",
                "campaign.cancel",
                "campaign.resend",
                "campaign.confirm",
                "campaign.test_email",
            ),
            partitions=4,
            producers=("crm", "mailer publish"),
            consumers=("planner", "reconciler"),
            configs={"retention.ms": _WEEK_MS, "cleanup.policy": "delete"},
            description="Commands from the CRM: what to send, to whom, and lifecycle changes.",
        ),
        TopicSpec(
            topic=Topic.SEND_COMMANDS,
            key="send_id (deterministic from campaign and recipient: spreads load, "
            "keeps every attempt of one recipient on one partition)",
            kinds=("send.email",),
            partitions=8,
            producers=("planner",),
            consumers=("sender",),
            configs={"retention.ms": _WEEK_MS, "cleanup.policy": "delete"},
            description="One command per recipient (or test email) to render and send.",
        ),
        TopicSpec(
            topic=Topic.SEND_OUTCOMES,
            key="send_id",
            kinds=(
                "outcome.sent",
                "outcome.failed",
                "outcome.skipped",
                "outcome.deferred",
                "outcome.unknown",
            ),
            partitions=8,
            producers=("sender",),
            consumers=("reconciler", "analytics"),
            configs={"retention.ms": _MONTH_MS, "cleanup.policy": "delete"},
            description="What happened to each send command, with the SMTP reply.",
        ),
        TopicSpec(
            topic=Topic.CAMPAIGN_STATUS,
            key="campaign_id",
            kinds=("campaign.status",),
            partitions=4,
            producers=("reconciler",),
            consumers=("crm",),
            configs={"retention.ms": _MONTH_MS, "cleanup.policy": "delete"},
            description="Every change of a campaign's status, with counts, for the CRM.",
        ),
        TopicSpec(
            topic=Topic.DEAD_LETTERS,
            key="the original message's key",
            kinds=("dead_letter",),
            partitions=1,
            producers=("planner", "sender", "reconciler"),
            consumers=("ops",),
            configs={"retention.ms": _MONTH_MS, "cleanup.policy": "delete"},
            description="Messages no service could accept: the reason and the original bytes.",
        ),
        TopicSpec(
            topic=Topic.SUPPRESSIONS,
            key="email, normalised (trimmed, lower-cased: every change of one address keeps order)",
            kinds=("suppression.add", "suppression.remove"),
            partitions=4,
            producers=("crm", "unsubscribe endpoint"),
            consumers=("reconciler",),
            # compacted: the latest add or remove of every address is kept for good
            configs={"cleanup.policy": "compact"},
            description="Addresses never to be mailed again (R32) and their removal from that list.",
        ),
    )
}


def spec(topic: Topic) -> TopicSpec:
    """The registry entry of `topic`."""
    return REGISTRY[topic]


def topic_name(topic: Topic, settings: Settings) -> str:
    """The broker name of `topic` under `settings`."""
    return REGISTRY[topic].name(settings)


def kind_topic(kind: str) -> Topic:
    """The topic that carries messages of `kind`; `KeyError` for an unknown kind."""
    for t, s in REGISTRY.items():
        if kind in s.kinds:
            return t
    raise KeyError(kind)
