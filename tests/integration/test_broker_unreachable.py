"""A service or `mailer publish` pointed at a port where no broker listens says so (issue 13, item 8).

Before: a planner printed 175 lines of librdkafka `Connection refused` in 10 s and nothing of
its own, and `mailer publish start` waited for ever. Now each prints one line of ours naming the
address and what to check, a few lines in all, and exits with status 1 after its timeout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.pipeline.embedded import free_port
from services.pipeline.settings import Settings
from tests.support.campaigns import campaign
from tests.support.processes import ROOT, ServiceRunner

pytestmark = pytest.mark.integration

TIMEOUT = 5.0


def closed_port_settings() -> tuple[Settings, str]:
    address = f"127.0.0.1:{free_port()}"
    settings = dataclasses.replace(Settings(), kafka_bootstrap_servers=address,
                                   kafka_startup_timeout=TIMEOUT, publish_timeout=60.0)
    return settings, address


def check_said_once(output: str, address: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 10, f"{len(lines)} lines:\n{output}"
    ours = [line for line in lines if address in line and "KAFKA_BOOTSTRAP_SERVERS" in line]
    assert ours, output
    assert "Traceback" not in output and "%3|" not in output and "rdkafka#" not in output, output


@pytest.mark.parametrize("service", ["planner", "sender", "reconciler"])
def test_a_service_without_a_broker_says_where_it_looked_and_exits(service: str, tmp_path: Path) -> None:
    settings, address = closed_port_settings()
    runner = ServiceRunner(settings, tmp_path / "logs")
    started = time.monotonic()
    proc = runner.start(service)
    try:
        assert proc.wait(TIMEOUT + 15) == 1
    finally:
        runner.stop_all(grace=5)
    took = time.monotonic() - started
    output = runner.logs()
    check_said_once(output.split("=====\n", 1)[1], address)
    assert "startup_failed" in output and f"no answer within {TIMEOUT:g} s" in output
    assert took < TIMEOUT + 15


def test_publish_without_a_broker_gives_up_after_its_timeout(tmp_path: Path) -> None:
    settings, address = closed_port_settings()
    definition = tmp_path / "campaign.json"
    definition.write_text(json.dumps(campaign("unreachable")))
    people = tmp_path / "recipients.csv"
    with people.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name"])
        writer.writerows([[f"user{i}@example.com", f"User {i}"] for i in range(3)])
    env = {**settings.to_env(), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "services.pipeline.cli", "publish", "start", "--campaign", str(definition),
         "--recipients", str(people), "--timeout", str(TIMEOUT)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT + 30,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < TIMEOUT + 5
    assert done.stdout == ""
    check_said_once(done.stderr, address)
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("mailer publish: cannot connect to Kafka at " + address)
