"""Polling the reconciler's endpoint from tests."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import orjson

from services.pipeline.settings import Settings
from tests.support.processes import ServiceRunner


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET `url`; (status, JSON body) for 2xx and 4xx alike."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
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
        time.sleep(0.5)
    raise AssertionError(f"campaign not {status} in {timeout}s: {body}\n{services.logs()}")
