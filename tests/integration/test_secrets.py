"""Secrets never reach logs, events, errors, metrics or the poll endpoint (issue 6, item 5).

A campaign runs with a known SMTP password (from a secret file), a known quota API key (from
the environment), known API tokens and a known Kafka SASL password (from the environment, on a
SASL_SSL listener: tests/support/secured_kafka.py); the SMTP server, the quota endpoint and the
broker check that they were really used. Then the password goes wrong (an authentication
failure, an error path). Every output is searched: each service's whole log, every message of
every topic, the poll endpoint in both languages, /metrics, and what the ops CLI prints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.pipeline.embedded import free_port
from services.pipeline.kafka_local import KafkaCluster
from services.pipeline.publish import publish, publish_campaign
from services.pipeline.publish import test_email_message as build_test_email
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY
from tests.support.campaigns import campaign, recipients
from tests.support.certificates import Certificates
from tests.support.kafka import read_topic
from tests.support.poll import API_TOKEN, get_json, wait_for_status, write_token_file
from tests.support.processes import ROOT, run_services
from tests.support.secured_kafka import KAFKA_PASSWORD, kafka_certs, secure, secured_kafka
from tests.support.smtp_server import PasswordCheck, SmtpServer

pytestmark = pytest.mark.integration
__all__ = ["kafka_certs", "secured_kafka"]  # the fixtures this module uses

SMTP_PASSWORD = f"smtp-pw-{secrets.token_hex(12)}"
QUOTA_KEY = f"quota-key-{secrets.token_hex(12)}"
MANAGER_TOKEN = f"mgr-token-{secrets.token_hex(12)}"


class QuotaEndpoint(BaseHTTPRequestHandler):
    """A provider's `GET /v1/user`: answers the quota to the right key, 401 otherwise."""

    seen_keys: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        key = self.headers.get("Authorization", "")
        self.seen_keys.append(key)
        ok = key == QUOTA_KEY
        body = json.dumps({"quota": 1000, "hlimit": 0, "hsent": 0, "dlimit": 0, "dsent": 0} if ok
                          else {"error": "invalid api key"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def quota_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), QuotaEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/user"
    server.shutdown()


def outputs(settings: Settings, log_dir: Path, metrics_ports: list[int], campaign_ids: list[str]) -> str:
    """Everything the pipeline said: logs, topics, poll endpoint, /metrics, ops CLI."""
    parts = [p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log"))]
    assert parts and all(parts), "no service logs to search"
    for spec in REGISTRY.values():
        for msg in read_topic(settings, spec.name(settings), timeout=8):
            parts.append((msg.key() or b"").decode(errors="replace"))
            parts.append((msg.value() or b"").decode(errors="replace"))
    for campaign_id in campaign_ids:
        for lang in ("ru", "en"):
            url = f"http://127.0.0.1:{settings.http_port}/campaigns/{campaign_id}"
            body = get_json(url, headers={"Accept-Language": lang})[1]
            parts.append(json.dumps(body, ensure_ascii=False))
        env = {**settings.to_env(), "PYTHONPATH": str(ROOT)}
        for command in (["ops", "campaign", campaign_id], ["ops", "limiter"], ["ops", "dead-letters"]):
            done = subprocess.run([sys.executable, "-m", "services.pipeline.cli", *command], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=60)
            parts.append(done.stdout + done.stderr)
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            parts.append(resp.read().decode())
    return "\n".join(parts)


def test_no_secret_appears_in_any_output(settings: Settings, tmp_path: Path, quota_endpoint: str,
                                         secured_kafka: KafkaCluster, kafka_certs: Certificates) -> None:
    password_file = tmp_path / "smtp_password"
    password_file.write_text(SMTP_PASSWORD + "\n")
    auth = PasswordCheck("mailer", SMTP_PASSWORD)
    smtp = SmtpServer(auth)
    smtp.start()
    tokens = write_token_file(tmp_path / "tokens.json", (API_TOKEN, "test-ops", "ops"),
                              (MANAGER_TOKEN, "manager-7", "manager"))
    secured = dataclasses.replace(
        secure(settings, secured_kafka, kafka_certs),
        smtp_port=smtp.port, smtp_username="mailer", smtp_password_file=str(password_file),
        quota_url=quota_endpoint, quota_api_key=QUOTA_KEY, quota_sync_interval=1.0, api_tokens_file=tokens,
    )
    ports = [free_port() for _ in range(3)]
    log_dir = tmp_path / "logs"
    try:
        with run_services(secured, log_dir) as services:
            procs = {name: services.start(name, "--metrics-port", str(port))
                     for name, port in zip(("planner", "sender", "reconciler"), ports, strict=True)}
            people = recipients(5, domain="secret.example.com")
            smtp.reject(people[0]["email"])
            asyncio.run(publish_campaign(secured, campaign("guarded"), people))
            test_email = build_test_email(campaign("guarded"), "qa@example.com", "manager-7")
            asyncio.run(publish(secured, [test_email]))
            wait_for_status(secured, services, "guarded", "completed")
            url = f"http://127.0.0.1:{secured.http_port}/campaigns/guarded"
            code, own = get_json(url, token=MANAGER_TOKEN)
            assert code == 200 and own["counts"]["sent"] == 4
            # the password goes wrong: a new sender's login is refused, the account stops
            auth.password = "rotated-at-the-provider"
            procs["sender"].send_signal(signal.SIGTERM)
            assert procs["sender"].wait(30) == 0
            services.forget(procs["sender"])
            services.start("sender", "--metrics-port", str(ports[1]))
            others = recipients(2, domain="x.example.com")
            asyncio.run(publish_campaign(secured, campaign("refused-login"), others))
            wait_for_status(secured, services, "refused-login", "paused", timeout=90)
            said = outputs(secured, log_dir, ports, ["guarded", "refused-login"])
    finally:
        smtp.stop()

    # the secrets were really in use: the server saw the password, the endpoint the key
    assert ("mailer", True) in auth.logins and ("mailer", False) in auth.logins
    assert QUOTA_KEY in QuotaEndpoint.seen_keys
    assert "535" in said or "authentication" in said.lower()  # the failure itself is reported
    for name, secret in (("SMTP password", SMTP_PASSWORD), ("quota API key", QUOTA_KEY),
                         ("ops API token", API_TOKEN), ("manager API token", MANAGER_TOKEN),
                         ("Kafka SASL password", KAFKA_PASSWORD)):
        assert secret not in said, f"the {name} appears in the pipeline's output"
    assert len(said) > 10_000  # the search covered real output
    print(f"\n5 secrets searched in {len(said):,} characters of logs, topics, poll answers, metrics "
          f"and ops output: none found; {len(auth.logins)} logins tried")
