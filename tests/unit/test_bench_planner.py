"""The planner benchmark's pure parts: keys of the send commands, the raw producer's configuration."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
import pytest

from benchmarks.common import TopicSpan
from benchmarks.planner import RawRun, keyed, raw_config
from services.pipeline import producer as producer_module
from services.pipeline.producer import AsyncProducer
from services.pipeline.settings import Settings


def test_keyed_uses_the_send_id_as_key_and_keeps_the_bytes() -> None:
    values = [orjson.dumps({"kind": "send.email", "send_id": f"id-{i}"}) for i in range(3)]
    assert keyed(values) == [(f"id-{i}".encode(), value) for i, value in enumerate(values)]


class _FakeProducer:
    configs: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.configs.append(config)

    def poll(self, timeout: float) -> int:
        return 0


def test_raw_config_is_the_pipeline_producers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline must not drift from `AsyncProducer`'s settings (bar the client id)."""
    monkeypatch.setattr(producer_module, "Producer", _FakeProducer)
    settings = Settings.from_env({})
    pipeline = AsyncProducer(settings, client_id="x")
    pipeline._stop.set()
    pipeline._poller.join(timeout=2)
    own = ("client.id", "error_cb", "logger")  # each client has its own id and error reporter
    expected = {k: v for k, v in _FakeProducer.configs[-1].items() if k not in own}
    assert {k: v for k, v in raw_config(settings).items() if k not in own} == expected


def test_raw_rate_is_messages_over_wall_time() -> None:
    assert RawRun(2.0, TopicSpan(1000, 10.0, 11.0)).rate == 500.0
