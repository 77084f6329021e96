"""`mailer topics`: the registry's topics for a platform team, and creating or checking them.

Contract: `topic_specs(settings)` lists every registry topic as the broker must
hold it: its name with MAILER_TOPIC_PREFIX, partitions, replication factor,
configs (min.insync.replicas included), key, message kinds, and which services
write and read it. `mailer topics --print` prints them as a table (`--json`:
as JSON) without contacting Kafka. `--create` and `--check` do what the
services do at start-up under MAILER_TOPICS=create and =check (no flag: what
MAILER_TOPICS says); a broker that cannot be used or a topic that is not ready
ends the command with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY


def topic_specs(settings: Settings) -> list[dict[str, Any]]:
    """Every registry topic as a platform team creates it."""
    return [
        {
            "name": spec.name(settings),
            "partitions": spec.partitions_for(settings),
            "replication_factor": settings.topic_replication_factor,
            "configs": spec.configs_for(settings),
            "key": spec.key,
            "kinds": list(spec.kinds),
            "producers": list(spec.producers),
            "consumers": list(spec.consumers),
            "description": spec.description,
        }
        for spec in REGISTRY.values()
    ]


def spec_lines(specs: list[dict[str, Any]]) -> list[str]:
    """The specs as an aligned table: one row per topic (the key's first words only)."""
    header = ["topic", "partitions", "replicas", "configs", "key", "written by", "read by"]
    rows = [
        [s["name"], str(s["partitions"]), str(s["replication_factor"]),
         ",".join(f"{k}={v}" for k, v in sorted(s["configs"].items())),
         s["key"].split(" (")[0], ", ".join(s["producers"]), ", ".join(s["consumers"])]
        for s in specs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def add_topics_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mailer topics`."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print", dest="print_specs", action="store_true",
                        help="print every topic's spec (name, partitions, replicas, configs, key, "
                        "who writes and reads it) without contacting Kafka")
    action.add_argument("--create", dest="topics_mode", action="store_const", const="create",
                        help="create the missing topics (MAILER_TOPICS=create)")
    action.add_argument("--check", dest="topics_mode", action="store_const", const="check",
                        help="create nothing; fail unless every topic exists with its partitions "
                        "(MAILER_TOPICS=check)")
    parser.add_argument("--json", action="store_true", help="with --print: print JSON")


def topics_command(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer topics [--print [--json] | --create | --check]`."""
    if args.print_specs:
        specs = topic_specs(settings)
        if args.json:
            print(orjson.dumps(specs, option=orjson.OPT_INDENT_2).decode())
        else:
            print("\n".join(spec_lines(specs)))
        return 0
    from services.pipeline.kafka_admin import BrokerUnavailable, TopicsError, ensure_topics
    from services.pipeline.kafka_problems import BrokerReporter

    mode = args.topics_mode or settings.topics_mode
    try:
        created = ensure_topics(settings, mode=mode, reporter=BrokerReporter(settings, logger=None))
    except (BrokerUnavailable, TopicsError) as exc:
        print(f"mailer topics: {exc}", file=sys.stderr)
        return 1
    if mode == "check":
        print(f"all {len(REGISTRY)} topics exist with their partitions")
    else:
        print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0
