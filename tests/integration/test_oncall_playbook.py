"""Every command of docs/ONCALL_PLAYBOOK.md runs against a live pipeline and prints what the
playbook says it prints (R27); `mailer ops` explains a deferred campaign in one command.

The scenario: a campaign deferred by its own hourly rate, a dead letter, then a campaign
stuck because its sender is gone. Commands run as the on-call engineer runs them: the
`mailer` CLI in a subprocess with the services' environment.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from services.pipeline.embedded import free_port
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import produce_raw
from tests.support.poll import wait_for_status
from tests.support.processes import ROOT, ServiceRunner

pytestmark = pytest.mark.integration

PLAYBOOK = ROOT / "docs" / "ONCALL_PLAYBOOK.md"
OPS_COMMANDS = {"campaign", "audit", "stuck", "deferred", "limiter", "lag", "dead-letters",
                "reconcile", "pause", "resume", "breaker"}


def playbook_commands(path: Path = PLAYBOOK) -> list[str]:
    """Every line of the playbook's ```sh blocks, in order; each must be a `mailer` command."""
    commands, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not inside and line.strip() == "```sh":
            inside = True
        elif inside and line.strip() == "```":
            inside = False
        elif inside and line.strip():
            assert line.startswith("mailer "), f"{path.name}:{number}: not a mailer command: {line}"
            commands.append(line.strip())
    return commands


def mailer(services: ServiceRunner, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run one `mailer …` command line as the on-call engineer would."""
    argv = [sys.executable, "-m", "services.pipeline.cli",
            *[arg.strip('"') for arg in re.findall(r'"[^"]*"|\S+', command)][1:]]
    return subprocess.run(argv, cwd=ROOT, env={**services.env(), **env}, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_playbook_covers_every_ops_command() -> None:
    used = {c.split()[2] for c in playbook_commands() if c.startswith("mailer ops ")}
    assert used == OPS_COMMANDS


def test_every_alert_has_its_section_and_every_alert_named_exists() -> None:
    text = PLAYBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", text, re.M)}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r["annotations"]["runbook"] for g in rules["groups"] for r in g["rules"]}
    for name, runbook in alerts.items():
        assert runbook.split("#")[1] in anchors, f"{name}: no section for {runbook}"
        assert f"`{name}`" in text, f"{name} is not named in the playbook"
    assert set(re.findall(r"`(Mailer[A-Za-z]+)`", text)) <= set(alerts)


def test_every_playbook_command_runs_against_a_live_pipeline(
    settings: Settings, services: ServiceRunner, sql: Callable[..., list[tuple[Any, ...]]],
) -> None:
    for name in ("planner", "reconciler"):
        services.start(name)
    sender = services.start("sender")
    people = recipients(6, domain="playbook.example.com")
    asyncio.run(publish_campaign(settings, campaign("slow", rate_per_hour=2), people))
    wait_for_status(settings, services, "slow", "deferred")
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_COMMANDS, settings),
                [(b"bad", b'{"kind": "campaign.start", "campaign_id": "bad"}')])

    results: dict[str, subprocess.CompletedProcess[str]] = {}
    for line in dict.fromkeys(playbook_commands()):
        command = line.replace("<campaign_id>", "slow").replace("<account>", "default")
        result = results[command] = mailer(services, command)
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"
        assert result.returncode == 0, f"{command} -> {result.returncode}\n{result.stdout}{result.stderr}"
        assert result.stdout.strip(), command

    # one command explains the deferral: status, the binding limit, the time it ends, the text
    inspected = results["mailer ops campaign slow"].stdout
    assert "status     DEFERRED: " in inspected and "deferred   campaign_rate until " in inspected
    assert re.search(r"counts     total=6 .*sent=2 ", inspected), inspected
    assert re.search(r"campaign_rate\s+4\s+\d{4}-", inspected), inspected  # parked, with a due time
    audit = results["mailer ops audit slow"].stdout
    # the deferral's reason is the manager's text (issue 14, defect 17), not a code
    assert re.search(r"\ssystem\s+defer\s+sending -> deferred\s+Reached the campaign's limit of 2 emails"
                     r" per hour\. We will resume ", audit), audit
    assert re.search(r"^slow\s+deferred\s+campaign_rate\s", results["mailer ops deferred"].stdout, re.M)
    assert results["mailer ops stuck"].stdout.startswith("no campaign stuck")
    limiter = results["mailer ops limiter"].stdout
    assert "redis          ok" in limiter and "limiter state  present" in limiter
    assert "account default" in limiter and "breaker      closed" in limiter
    assert re.search(settings.app_id("sender") + r"  state=stable  members=(1|\?)\n",  # ?: tansu
                     results["mailer ops lag"].stdout)
    dead = results["mailer ops dead-letters --limit 20"].stdout
    assert re.search(r"\s(planner|reconciler)\s+\S+\s+\S+campaign-commands\[\d\]@\d+\s+bad\s", dead), dead
    payload = orjson.loads(mailer(services, "mailer ops dead-letters --limit 1 --payload --json").stdout)
    assert payload[0]["original"] == '{"kind": "campaign.start", "campaign_id": "bad"}'
    assert "no anomalies found" in results["mailer ops reconcile"].stdout
    assert results["mailer ops resume slow --actor oncall"].stdout.strip().endswith("slow is sending")
    audit = mailer(services, "mailer ops audit slow").stdout  # now with the pause and the resume
    assert re.search(r"\soncall\s+pause\s+sending -> paused\s+checking delivery", audit), audit
    assert re.search(r"\soncall\s+resume\s+paused -> sending", audit), audit

    # Redis down: the limiter command says so, with exit status 1
    down = mailer(services, "mailer ops limiter", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 1 and "redis          unreachable (" in down.stdout, down.stdout + down.stderr

    # a campaign stuck because no sender runs: `ops stuck` finds it, `ops lag` shows why
    sender.send_signal(signal.SIGTERM)
    assert sender.wait(30) == 0
    services.forget(sender)
    asyncio.run(publish_campaign(settings, campaign("stalled"), recipients(3, domain="stalled.example.com")))
    wait_for_status(settings, services, "stalled", "sending")
    assert sql("UPDATE campaigns SET updated_at = now() - interval '2 hours', first_sent_at = NULL"
               " WHERE campaign_id = 'stalled' RETURNING campaign_id") == [("stalled",)]
    stuck = mailer(services, "mailer ops stuck")
    assert stuck.returncode == 1, stuck.stdout + stuck.stderr
    assert re.search(r"^STUCK  stalled  3 recipients waiting, no progress for 1\d\d min", stuck.stdout, re.M)
    lag = mailer(services, "mailer ops lag").stdout
    sender_lines = lag.split(settings.app_id("sender"))[1].split(settings.app_id("reconciler"))[0]
    assert re.search(r"send-commands\[\d+\]  committed=\d+  high=\d+  lag=[1-9]\d*  lag_seconds=",
                     sender_lines), lag  # the stalled campaign's sends wait, and their age shows
    unknown = mailer(services, "mailer ops campaign nosuch")
    assert unknown.returncode == 1 and "no campaign 'nosuch'" in unknown.stderr
