"""The poll endpoint's bearer tokens on a live reconciler (R16).

No token, a malformed header or an unknown token: 401 with a Bearer
challenge; a manager's token sees its own campaigns and gets the 404 of an
unknown campaign for another manager's; ops and admin tokens see all;
/healthz needs no token; without a tokens file every request is refused; no
token ever reaches the service logs, the refusals do (with the actor id).
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.pipeline.settings import Settings
from tests.support.poll import API_ACTOR, API_TOKEN, get_json, write_token_file
from tests.support.processes import ServiceRunner, run_services

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
MANAGER_7 = secrets.token_urlsafe(32)
MANAGER_8 = secrets.token_urlsafe(32)
ADMIN = secrets.token_urlsafe(32)
UNKNOWN = secrets.token_urlsafe(32)


def request(settings: Settings, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of GET `path` with exactly `headers`."""
    req = urllib.request.Request(f"http://127.0.0.1:{settings.http_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read()), dict(err.headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_healthy(settings: Settings, services: ServiceRunner, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            if request(settings, "/healthz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the reconciler's endpoint did not open\n{services.logs()}")


def add_campaign(sql: SQL, campaign_id: str, manager_id: str) -> None:
    sql("INSERT INTO campaigns (campaign_id, manager_id, name, status, total, sent)"
        " VALUES (%s, %s, 'Spring sale', 'completed', 3, 3) RETURNING 1", campaign_id, manager_id)


def service_log(services: ServiceRunner) -> str:
    """Everything every service wrote, whole files (logs() keeps only their tails)."""
    return "\n".join(path.read_text(errors="replace") for _, _, path in services.procs)


def events(log: str, name: str) -> list[dict[str, Any]]:
    records = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r for r in records if r.get("event") == name]


def test_tokens_roles_and_refusals(settings: Settings, services: ServiceRunner, sql: SQL) -> None:
    write_token_file(Path(settings.api_tokens_file), (API_TOKEN, API_ACTOR, "ops"),
                     (MANAGER_7, "manager-7", "manager"), (MANAGER_8, "manager-8", "manager"),
                     (ADMIN, "crm", "admin"))
    add_campaign(sql, "spring-7", "manager-7")
    add_campaign(sql, "spring-8", "manager-8")
    services.start("reconciler")
    wait_healthy(settings, services)

    # /healthz: no token needed (and a bad one does not matter)
    assert request(settings, "/healthz")[:2] == (200, {"status": "ok"})
    assert request(settings, "/healthz", bearer(UNKNOWN))[:2] == (200, {"status": "ok"})

    # no token, malformed headers, an unknown token: 401 with a Bearer challenge
    for headers, error in (
        ({}, "missing_token"),
        ({"Authorization": f"Basic {API_TOKEN}"}, "malformed_authorization"),
        ({"Authorization": "Bearer"}, "malformed_authorization"),
        ({"Authorization": f"Bearer {API_TOKEN} extra"}, "malformed_authorization"),
        (bearer(UNKNOWN), "invalid_token"),
        (bearer(API_TOKEN[:-1]), "invalid_token"),
    ):
        code, body, answer = request(settings, "/campaigns/spring-7", headers)
        assert (code, body["error"]) == (401, error), (headers, body)
        assert answer["WWW-Authenticate"].startswith("Bearer"), answer
        assert "spring" not in orjson.dumps(body).decode()  # nothing of the campaign
    assert 'error="invalid_token"' in request(settings, "/campaigns/x", bearer(UNKNOWN))[2][
        "WWW-Authenticate"]
    assert request(settings, "/campaigns/nope", {})[0] == 401  # unknown campaign: still 401 first

    # a manager sees its own campaigns; another manager's is as unknown as a missing one
    code, own, _ = request(settings, "/campaigns/spring-7", bearer(MANAGER_7))
    assert (code, own["campaign_id"], own["manager_id"]) == (200, "spring-7", "manager-7")
    code, other, _ = request(settings, "/campaigns/spring-8", bearer(MANAGER_7))
    _, missing, _ = request(settings, "/campaigns/spring-9", bearer(MANAGER_7))
    assert code == 404 and other["error"] == missing["error"] == "campaign_not_found"
    assert other["message"] == missing["message"].replace("spring-9", "spring-8")
    assert request(settings, "/campaigns/spring-8", bearer(MANAGER_8))[0] == 200
    assert request(settings, "/campaigns/spring-7", bearer(MANAGER_8))[0] == 404
    assert request(settings, "/campaigns/spring-9", bearer(MANAGER_8))[0] == 404

    # ops and admin see every campaign; the language still follows Accept-Language
    for token in (API_TOKEN, ADMIN):
        for campaign_id in ("spring-7", "spring-8"):
            code, body, _ = request(settings, f"/campaigns/{campaign_id}", bearer(token))
            assert (code, body["campaign_id"]) == (200, campaign_id)
    ru = request(settings, "/campaigns/spring-8", bearer(API_TOKEN))[1]
    en = request(settings, "/campaigns/spring-8", {**bearer(API_TOKEN), "Accept-Language": "en"})[1]
    assert ru["reason"] != en["reason"] and ru["status"] == en["status"] == "completed"
    assert get_json(f"http://127.0.0.1:{settings.http_port}/campaigns/spring-7")[0] == 200
    assert request(settings, "/campaigns/nope", bearer(API_TOKEN))[:2] == (
        404, {"error": "campaign_not_found", "message": "no campaign with id 'nope'"})

    services.stop_all()
    log = service_log(services)
    for token in (API_TOKEN, MANAGER_7, MANAGER_8, ADMIN, UNKNOWN, API_TOKEN[:-1]):
        assert token not in log and token not in services.logs()
    refused = events(log, "api.unauthorized")
    assert {r["reason"] for r in refused} >= {"missing_token", "malformed_authorization", "unknown_token"}
    assert all(r["path"].startswith("/campaigns/") and r["service"] == "reconciler" for r in refused)
    forbidden = events(log, "api.forbidden")
    assert [(r["actor_id"], r["campaign_id"]) for r in forbidden] == [
        ("manager-7", "spring-8"), ("manager-8", "spring-7")]


def test_without_a_tokens_file_every_request_is_refused(
    settings: Settings, sql: SQL, tmp_path: Path
) -> None:
    settings = replace(settings, api_tokens_file="")
    add_campaign(sql, "spring-7", "manager-7")
    with run_services(settings, tmp_path / "no-tokens-logs") as services:
        services.start("reconciler")
        wait_healthy(settings, services)
        for headers in ({}, bearer(API_TOKEN)):
            code, body, answer = request(settings, "/campaigns/spring-7", headers)
            assert (code, body["error"]) == (401, "no_api_tokens")
            assert "no API tokens are configured" in body["message"]
            assert answer["WWW-Authenticate"].startswith("Bearer")
        assert request(settings, "/healthz")[:2] == (200, {"status": "ok"})
        services.stop_all()
        assert API_TOKEN not in service_log(services)
        assert events(service_log(services), "api.unauthorized")[0]["reason"] == "no_tokens_configured"
