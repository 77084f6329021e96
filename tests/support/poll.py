"""Polling the reconciler's endpoint from tests, with a bearer token.

`API_TOKEN` is this test run's `ops` token (random per run); the `settings`
fixture writes its hash to the MAILER_API_TOKENS_FILE every test's services
read, and `get_json` sends it unless told otherwise. `write_token_file`
writes a tokens file for other tokens (managers, ...).
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from services.pipeline.api_tokens import token_entry
from services.pipeline.settings import Settings
from tests.support.processes import ServiceRunner

#: The plain `ops` token of the test run (only its hash is in the tokens file).
API_TOKEN = secrets.token_urlsafe(32)
API_ACTOR = "test-ops"


def write_token_file(path: Path, *tokens: tuple[str, str, str]) -> str:
    """Write a MAILER_API_TOKENS_FILE holding the hashes of (token, actor_id, role); its path."""
    path.write_bytes(orjson.dumps({"tokens": [token_entry(t, actor, role) for t, actor, role in tokens]}))
    return str(path)


def auth_headers(token: str | None = API_TOKEN) -> dict[str, str]:
    """The Authorization header of `token` (none for None)."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def get_json(url: str, token: str | None = API_TOKEN,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET `url` with `token` (None: no Authorization header); (status, JSON body) for 2xx and 4xx alike."""
    request = urllib.request.Request(url, headers={**auth_headers(token), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


def wait_for_status(settings: Settings, services: ServiceRunner, campaign_id: str,
                    status: str, timeout: float = 240.0) -> dict[str, Any]:
    """Poll the endpoint until the campaign has `status`; fail with the logs otherwise."""
    url = f"http://127.0.0.1:{settings.http_port}/campaigns/{campaign_id}"
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            code, body = get_json(url)
        except (urllib.error.URLError, ConnectionError):
            code = 0
        if code == 200 and body["status"] == status:
            return body
        if code == 401:
            raise AssertionError(f"the endpoint refused the test token: {body}\n{services.logs()}")
        time.sleep(0.5)
    raise AssertionError(f"campaign not {status} in {timeout}s: {body}\n{services.logs()}")
