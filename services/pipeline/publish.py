"""Publishing CRM campaign commands: what the CRM does, as a library and a CLI.

Contract: `campaign_messages()` turns a campaign definition and its recipients
into one `campaign.start` and `ceil(n / chunk_size)` `campaign.recipients`
messages, each validated against its schema before anything is produced;
`publish_campaign()` produces them keyed by campaign id (so they stay in
order) and returns once the broker has all of them. `mailer publish` reads a
campaign JSON file and a recipients CSV (`email` column required, `name`
optional, every other column a template variable) and reports bad input with
the file and line, producing nothing; when Kafka does not take the messages
within MAILER_PUBLISH_TIMEOUT (`--timeout`) it says why in one line on stderr
(the address, what to check) and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from services.pipeline.contract import InvalidMessage, Message, encode, envelope, load_schema, validate
from services.pipeline.kafka_admin import TopicsError, ensure_topics
from services.pipeline.kafka_problems import BrokerReporter, BrokerUnavailable
from services.pipeline.producer import AsyncProducer, DeliveryError
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name

#: What a campaign definition may hold: the start message's fields, less the envelope and totals.
START_FIELDS = tuple(
    name for name in load_schema("campaign.start")["properties"]
    if name not in ("kind", "schema_version", "message_id", "occurred_at", "total_recipients",
                    "total_chunks")
)


class PublishError(ValueError):
    """Input that cannot become valid campaign commands; the message says where."""


def campaign_messages(
    campaign: dict[str, Any], recipients: list[dict[str, Any]], chunk_size: int = 1000
) -> Iterator[Message]:
    """The start message, then the recipient chunks, all validated."""
    if not recipients:
        raise PublishError("a campaign needs at least one recipient")
    if not 1 <= chunk_size <= 1000:
        raise PublishError("chunk size must be between 1 and 1000")
    chunks = math.ceil(len(recipients) / chunk_size)
    start = envelope(
        "campaign.start",
        **{k: campaign[k] for k in START_FIELDS if k in campaign},
        total_recipients=len(recipients),
        total_chunks=chunks,
    )
    yield _checked(start, Topic.CAMPAIGN_COMMANDS, "campaign")
    for index in range(chunks):
        chunk = envelope(
            "campaign.recipients",
            campaign_id=campaign.get("campaign_id"),
            chunk_index=index,
            recipients=recipients[index * chunk_size:(index + 1) * chunk_size],
        )
        try:
            yield validate(chunk, Topic.CAMPAIGN_COMMANDS)
        except InvalidMessage as exc:
            raise PublishError(_recipient_error(exc.reason, index * chunk_size, recipients)) from None


def lifecycle_message(kind: str, campaign_id: str, actor_id: str, reason: str | None,
                      role: str = "manager") -> Message:
    """A validated pause, resume, cancel, resend or confirm command of `actor_id` in `role`."""
    message = envelope(f"campaign.{kind}", campaign_id=campaign_id, actor_id=actor_id, actor_role=role)
    if reason:
        message["reason"] = reason
    return _checked(message, Topic.CAMPAIGN_COMMANDS, kind)


def test_email_message(campaign: dict[str, Any], to: str, actor_id: str, role: str = "manager") -> Message:
    """A validated test-email command for `campaign`'s template, sent to `to`, by `actor_id` in `role`."""
    fields = ("campaign_id", "manager_id", "account", "from", "reply_to", "template",
              "variables", "unsubscribe_url")
    message = envelope(
        "campaign.test_email",
        **{k: campaign[k] for k in fields if k in campaign},
        actor_id=actor_id,
        actor_role=role,
        to={"email": to},
    )
    return _checked(message, Topic.CAMPAIGN_COMMANDS, "test email")


async def publish(settings: Settings, messages: list[Message], *, progress: bool = False,
                  timeout: float | None = None, reporter: BrokerReporter | None = None) -> None:
    """Produce campaign commands keyed by campaign id and wait for the broker, at most `timeout`
    seconds (MAILER_PUBLISH_TIMEOUT); `BrokerUnavailable` (one line: the address and what to
    check) when it did not take them all."""
    timeout = settings.publish_timeout if timeout is None else timeout
    reporter = reporter or BrokerReporter(settings)
    topic = topic_name(Topic.CAMPAIGN_COMMANDS, settings)
    producer = AsyncProducer(settings, client_id="mailer-publish", error_cb=reporter.on_error,
                             logger=reporter, **{"message.timeout.ms": max(1, int(timeout * 1000))})
    try:
        async with asyncio.timeout(timeout):
            for i, message in enumerate(messages, 1):
                await producer.produce(topic, encode(message), message["campaign_id"])
                if progress and (i % 10 == 0 or i == len(messages)):
                    print(f"published {i}/{len(messages)} messages", file=sys.stderr)
            await producer.flush(timeout)
    except TimeoutError:
        raise reporter.unavailable(f"messages not delivered within {timeout:g} s") from None
    except DeliveryError as exc:
        raise reporter.unavailable(f"messages not delivered ({exc})") from None
    finally:
        with contextlib.suppress(DeliveryError):
            await producer.close(timeout=1.0)


async def publish_campaign(
    settings: Settings, campaign: dict[str, Any], recipients: list[dict[str, Any]],
    chunk_size: int = 1000,
) -> None:
    """Publish a whole campaign: start, then its recipient chunks."""
    await publish(settings, list(campaign_messages(campaign, recipients, chunk_size)))


def read_campaign(path: Path) -> dict[str, Any]:
    """A campaign definition from a JSON file."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise PublishError(f"{path}: cannot read ({exc.strerror})") from None
    except orjson.JSONDecodeError as exc:
        raise PublishError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PublishError(f"{path}: must hold a JSON object")
    return dict(data)


def read_recipients(path: Path) -> list[dict[str, Any]]:
    """Recipients from a CSV file with an `email` column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "email" not in reader.fieldnames:
                raise PublishError(f"{path}: the header must have an 'email' column")
            recipients = []
            for line, row in enumerate(reader, start=2):
                email = (row.get("email") or "").strip()
                if not email:
                    raise PublishError(f"{path}:{line}: empty email")
                recipient: dict[str, Any] = {"email": email}
                if row.get("name"):
                    recipient["name"] = row["name"]
                variables = {k: v for k, v in row.items() if k not in ("email", "name") and k}
                if variables:
                    recipient["variables"] = variables
                recipients.append(recipient)
    except OSError as exc:
        raise PublishError(f"{path}: cannot read ({exc.strerror})") from None
    return recipients


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands of `mailer publish`."""
    sub = parser.add_subparsers(dest="publish_kind", required=True, metavar="KIND")
    start = sub.add_parser("start", help="start a campaign: definition JSON + recipients CSV")
    start.add_argument("--campaign", type=Path, required=True, help="campaign JSON file")
    start.add_argument("--recipients", type=Path, required=True, help="recipients CSV file")
    start.add_argument("--chunk-size", type=int, default=1000, help="recipients per chunk (≤1000)")
    start.add_argument("--actor", default=None, help="who starts it (default: the campaign's manager)")
    start.add_argument("--confirmed", action="store_true",
                       help="confirm a campaign above MAILER_CONFIRM_RECIPIENTS recipients now")
    for kind in ("pause", "resume", "cancel", "resend", "confirm"):
        p = sub.add_parser(kind, help=f"{kind} a campaign")
        p.add_argument("campaign_id")
        p.add_argument("--actor", required=True, help="who asks (recorded in the audit log)")
        p.add_argument("--reason", default=None)
    test = sub.add_parser("test-email", help="send one test email of a campaign's template")
    test.add_argument("--campaign", type=Path, required=True, help="campaign JSON file")
    test.add_argument("--to", required=True, help="address to send the test to")
    test.add_argument("--actor", required=True)
    for p in (start, test, *(sub.choices[k] for k in ("pause", "resume", "cancel", "resend", "confirm"))):
        p.add_argument("--role", choices=("manager", "ops", "admin"), default="manager",
                       help="the actor's role: a manager acts on own campaigns only (default manager)")
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="give up (exit status 1) when Kafka has not taken every message by then "
                       "(default MAILER_PUBLISH_TIMEOUT)")


def publish_command(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer publish …`: build, validate, create topics, produce."""
    try:
        if args.publish_kind == "start":
            recipients = read_recipients(args.recipients)
            definition = read_campaign(args.campaign)
            definition.setdefault("actor_id", args.actor or definition.get("manager_id"))
            definition.setdefault("actor_role", args.role)
            if args.confirmed:
                definition["confirmed"] = True
            messages = list(campaign_messages(definition, recipients, args.chunk_size))
        elif args.publish_kind == "test-email":
            messages = [test_email_message(read_campaign(args.campaign), args.to, args.actor, args.role)]
        else:
            messages = [lifecycle_message(args.publish_kind, args.campaign_id, args.actor, args.reason,
                                          args.role)]
    except PublishError as exc:
        print(f"mailer publish: {exc}", file=sys.stderr)
        return 2
    timeout = settings.publish_timeout if args.timeout is None else args.timeout
    deadline = time.monotonic() + timeout
    reporter = BrokerReporter(settings, logger=None)  # the one line below says what went wrong
    try:
        ensure_topics(settings, timeout=timeout, reporter=reporter)
        asyncio.run(publish(settings, messages, progress=len(messages) > 20, reporter=reporter,
                            timeout=max(1.0, deadline - time.monotonic())))
    except (BrokerUnavailable, TopicsError) as exc:
        print(f"mailer publish: {exc}", file=sys.stderr)
        return 1
    print(f"published {len(messages)} message(s) for campaign {messages[0]['campaign_id']}")
    return 0


def _recipient_error(reason: str, offset: int, recipients: list[dict[str, Any]]) -> str:
    """Name the recipient (1-based position in the list) that a chunk's error is about."""
    match = re.search(r"recipients\[(\d+)\]", reason)
    if match is None:
        return f"recipients: {reason}"
    position = offset + int(match.group(1))
    return (f"recipient {position + 1} of {len(recipients)} "
            f"({recipients[position].get('email')!r}): {reason}")


def _checked(message: Message, topic: Topic, what: str) -> Message:
    try:
        return validate(message, topic)
    except InvalidMessage as exc:
        raise PublishError(f"{what}: {exc.reason}") from None
