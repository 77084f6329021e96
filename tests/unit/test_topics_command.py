"""`mailer topics --print` and the check of MAILER_TOPICS=check, without a broker."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import orjson
import pytest

from services.pipeline.cli import main
from services.pipeline.kafka_admin import check_topics
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY, Topic

ENV = {"MAILER_TOPIC_PREFIX": "prod.", "MAILER_TOPIC_REPLICATION_FACTOR": "3",
       "MAILER_TOPIC_MIN_INSYNC_REPLICAS": "2", "MAILER_SEND_COMMANDS_PARTITIONS": "24",
       "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # never contacted


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def test_print_lists_every_topic_for_a_platform_team(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["topic", "partitions", "replicas", "configs", "key", "written", "by",
                                "read", "by"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {f"prod.{t.value}" for t in Topic}
    send = rows["prod.mailer.send-commands"].split()
    assert send[1:3] == ["24", "3"]
    assert "min.insync.replicas=2" in send[3] and "retention.ms=" in send[3]
    assert "planner" in rows["prod.mailer.send-commands"] and "sender" in rows["prod.mailer.send-commands"]
    assert "cleanup.policy=compact" in rows["prod.mailer.suppressions"]


def test_print_json_holds_the_whole_spec(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "--print", "--json"]) == 0
    specs = {s["name"]: s for s in orjson.loads(capsys.readouterr().out)}
    assert len(specs) == len(REGISTRY)
    commands = specs["prod.mailer.campaign-commands"]
    assert commands["partitions"] == 4 and commands["replication_factor"] == 3
    assert commands["configs"]["min.insync.replicas"] == "2"
    assert commands["key"].startswith("campaign_id")
    assert commands["producers"] == ["crm", "mailer publish"]
    assert commands["consumers"] == ["planner", "reconciler"]
    assert "campaign.start" in commands["kinds"]


def test_print_create_and_check_exclude_each_other(env: None) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["topics", "--print", "--check"])
    assert exited.value.code == 2


def _metadata(topics: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(topics={
        name: SimpleNamespace(error=None, partitions={i: None for i in range(n)})
        for name, n in topics.items()
    })


def test_check_names_every_missing_or_too_small_topic() -> None:
    settings = replace(Settings(), topic_prefix="p.")
    present = {spec.name(settings): spec.partitions_for(settings) for spec in REGISTRY.values()}
    assert check_topics(settings, _metadata(present)) == []  # type: ignore[arg-type]
    present.pop("p.mailer.send-commands")
    present.pop("p.mailer.suppressions")
    present["p.mailer.send-outcomes"] = 2
    problems = check_topics(settings, _metadata(present))  # type: ignore[arg-type]
    assert problems == ["p.mailer.send-commands is missing (needs 8 partitions)",
                        "p.mailer.send-outcomes has 2 partitions, needs 8",
                        "p.mailer.suppressions is missing (needs 4 partitions)"]
