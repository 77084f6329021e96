"""Running the services as real child processes (`mailer <service>`), as production does.

Contract: `ServiceRunner.start(name)` launches `python -m services.pipeline.cli
name` with the test's settings as environment variables and its output in a
log file; `stop_all()` sends SIGTERM (faust's clean shutdown), then SIGKILL
after a grace period. `logs()` returns what the services printed, for failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from services.pipeline.kafka_admin import ensure_topics
from services.pipeline.settings import Settings
from services.reconciler.limiter_state import restore_limiter

ROOT = Path(__file__).resolve().parents[2]


class ServiceRunner:
    """The service processes of one test."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.started = 0

    def env(self) -> dict[str, str]:
        """The environment of a service process."""
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        """Start `mailer name`."""
        self.started += 1
        log = self.log_dir / f"{name}-{self.started}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.pipeline.cli", name, *extra],
                cwd=ROOT, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append((name, proc, log))
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop watching a process the test killed on purpose (its log stays)."""
        self.procs = [entry for entry in self.procs if entry[1] is not proc]

    def check_alive(self) -> None:
        """Raise with the log of any service that exited."""
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
                )

    def logs(self) -> str:
        """Everything the services printed."""
        return "\n".join(
            f"===== {name} =====\n{log.read_text(errors='replace')[-6000:]}"
            for name, _, log in self.procs
        )

    def stop_all(self, grace: float = 15.0) -> list[str]:
        """SIGTERM every service, SIGKILL what is still running after `grace` seconds;
        return the names of those that had to be killed."""
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        killed = []
        for name, proc, _ in self.procs:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed.append(name)
        return killed


@contextlib.contextmanager
def run_services(settings: Settings, log_dir: Path) -> Iterator[ServiceRunner]:
    """A ServiceRunner for `settings`, after what a deployment does first: create the
    registry's topics (so producing early does not auto-create one) and restore the
    limiter's Redis state (`mailer migrate`). Stops every service on exit and fails
    when one had to be killed because SIGTERM did not stop it."""
    ensure_topics(settings)
    asyncio.run(restore_limiter(settings))
    runner = ServiceRunner(settings, log_dir)
    try:
        yield runner
    finally:
        killed = runner.stop_all()
    # a service that does not stop on SIGTERM would be killed mid-work in production too
    assert not killed, f"{killed} did not stop within 15 s of SIGTERM\n{runner.logs()}"
