"""The pipeline on Apache Kafka over SASL_SSL (SCRAM-SHA-512) with mutual TLS (issue 13, items 7-8).

A one-node Kafka gets a SASL_SSL listener whose certificate a CA made here signed, a SCRAM user
and a demand for client certificates. A campaign runs end to end through it: every confluent
client (admin, producers, the tests' readers) and faust's aiokafka consumers and producer log in
with the user, the password from a secret file, the CA and the client certificate. Then a wrong
password, a wrong CA and a missing client certificate each stop `mailer publish` and a service
within seconds with one line naming the setting to check; no password appears in any output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.pipeline.kafka_local import KafkaCluster
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.certificates import Certificates
from tests.support.kafka import read_topic
from tests.support.poll import wait_for_status
from tests.support.processes import ROOT, ServiceRunner, run_services
from tests.support.secured_kafka import KAFKA_PASSWORD as PASSWORD
from tests.support.secured_kafka import kafka_certs, secure, secured_kafka
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration
__all__ = ["kafka_certs", "secured_kafka"]  # the fixtures this module uses

WRONG_PASSWORD = f"wrong-pw-{secrets.token_hex(12)}"
#: How soon a configuration the broker refuses must be reported (it is not retried).
PROMPTLY = 12.0


@pytest.fixture
def secured(settings: Settings, secured_kafka: KafkaCluster, kafka_certs: Certificates,
            tmp_path: Path) -> Settings:
    """The test's settings on the SASL_SSL listener, the password in a secret file."""
    return secure(settings, secured_kafka, kafka_certs, password_file=tmp_path / "kafka_password")


def test_a_campaign_runs_end_to_end_over_sasl_ssl(
    secured: Settings, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    Settings.from_env(secured.to_env())  # the services' own check accepts these settings
    log_dir = tmp_path / "logs"
    with run_services(secured, log_dir) as services:
        for name in ("planner", "sender", "reconciler"):
            services.start(name)
        people = recipients(30, domain="secured.example.com")
        asyncio.run(publish_campaign(secured, campaign("over-sasl-ssl"), people, chunk_size=10))
        view = wait_for_status(secured, services, "over-sasl-ssl", "completed", timeout=180)
        status = read_topic(secured, topic_name(Topic.CAMPAIGN_STATUS, secured), timeout=30)
    assert view["counts"]["sent"] == 30
    assert sum(smtp_server.delivered().values()) == 30
    assert any(json.loads(m.value() or b"{}").get("status") == "completed" for m in status)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))
    assert "kafka_unavailable" not in logs and "startup_failed" not in logs
    assert PASSWORD not in logs


def _cli(settings: Settings, *args: str) -> tuple[int, str, float]:
    env = {**settings.to_env(), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "services.pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def _publish(settings: Settings, tmp_path: Path) -> tuple[int, str, float]:
    definition = tmp_path / "campaign.json"
    definition.write_text(json.dumps(campaign("refused")))
    people = tmp_path / "people.csv"
    people.write_text("email,name\nann@example.com,Ann\n")
    return _cli(settings, "publish", "start", "--campaign", str(definition), "--recipients", str(people))


def _service(settings: Settings, tmp_path: Path) -> tuple[int, str, float]:
    runner = ServiceRunner(settings, tmp_path / "service-logs")
    started = time.monotonic()
    proc = runner.start("planner")
    try:
        code = proc.wait(60)
    finally:
        runner.stop_all(grace=5)
    return code, runner.logs().split("=====\n", 1)[1], time.monotonic() - started


REFUSALS = {
    "wrong password": ({"kafka_sasl_password_file": "", "kafka_sasl_password": WRONG_PASSWORD},
                       "MAILER_KAFKA_SASL_PASSWORD", "refused the SASL login"),
    "wrong CA": ({"kafka_ssl_ca_file": "other_ca"}, "MAILER_KAFKA_SSL_CA_FILE", "certificate verify failed"),
    "no client certificate": ({"kafka_ssl_cert_file": "", "kafka_ssl_key_file": ""},
                              "MAILER_KAFKA_SSL_CERT_FILE", "TLS handshake"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("command", ["publish", "planner"])
def test_a_refused_configuration_is_one_line_naming_the_setting_within_seconds(
    case: str, command: str, secured: Settings, kafka_certs: Certificates, tmp_path: Path,
) -> None:
    changes, setting, reason = REFUSALS[case]
    wrong = dataclasses.replace(secured, **{
        name: str(kafka_certs.other_ca) if value == "other_ca" else value for name, value in changes.items()
    })
    code, output, took = (_publish if command == "publish" else _service)(wrong, tmp_path)
    assert code == 1, output
    assert took < PROMPTLY, f"{took:.1f} s:\n{output}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= (1 if command == "publish" else 3), output
    named = [line for line in lines if setting in line and reason in line]
    assert named, output
    assert secured.kafka_bootstrap_servers.split(",")[0] in named[-1]
    assert "Traceback" not in output and "%3|" not in output
    assert PASSWORD not in output and WRONG_PASSWORD not in output
