"""Restarting every sender at once: the group forms again and sending goes on within seconds.

Issue 14, defect 18: on tansu both senders once looped "(Re-)joining" for 8 minutes with
2,333 send commands pending. This test restarts both senders in the middle of a campaign,
on each broker, and measures how long the send topic goes without a delivery.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from services.pipeline.consumer_lag import ProgressWatch, lag_lines, measure
from services.pipeline.settings import Settings
from tests.integration.test_delivery_guarantees import start_campaign, view, wait_until
from tests.support.processes import run_services
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration


@pytest.mark.tansu_smoke
def test_d18_restarting_both_senders_at_once_resumes_sending_within_seconds(
    settings: Settings, smtp_server: SmtpServer, tmp_path: object, broker_kind: str,
) -> None:
    smtp_server.handler.data_delay = 0.01  # a campaign that lasts long enough to restart in
    settings = replace(settings, sender_concurrency=4, claim_timeout=20.0)
    with run_services(settings, tmp_path / "logs") as services:  # type: ignore[operator]
        for name in ("planner", "reconciler"):
            services.start(name)
        first = [services.start("sender"), services.start("sender")]
        start_campaign(settings, "restart-both", 3000, confirmed=True)
        wait_until("200 delivered", lambda: len(smtp_server.delivered()) >= 200, services)
        for proc in first:
            proc.send_signal(signal.SIGKILL)
        for proc in first:
            proc.wait(30)
            services.forget(proc)
        stopped_at = len(smtp_server.delivered())
        restarted = time.monotonic()
        services.start("sender")
        services.start("sender")
        wait_until("a delivery after the restart",
                   lambda: len(smtp_server.delivered()) > stopped_at + 20, services, timeout=240)
        gap = time.monotonic() - restarted
        wait_until("campaign completed",
                   lambda: view(settings, "restart-both").get("status") == "completed",
                   services, timeout=300)
    print(f"\n{broker_kind}: sending resumed {gap:.1f} s after both senders were restarted")
    assert gap < 60, f"sending stalled {gap:.0f} s after restarting both senders"


@pytest.mark.tansu_smoke
def test_d18_a_group_that_consumes_nothing_is_flagged_stalled(
    settings: Settings, smtp_server: SmtpServer, tmp_path: object, broker_kind: str,
) -> None:
    """Send commands wait and no sender consumes them: `mailer ops lag` says STALLED, and the
    exporter's progress watch flags the group once its offsets stood still long enough."""
    with run_services(settings, tmp_path / "logs") as services:  # type: ignore[operator]
        for name in ("planner", "reconciler"):
            services.start(name)
        sender = services.start("sender")
        start_campaign(settings, "before", 20)
        wait_until("campaign before", lambda: view(settings, "before").get("status") == "completed",
                   services)
        sender.send_signal(signal.SIGKILL)
        sender.wait(30)
        services.forget(sender)
        start_campaign(settings, "waiting", 50)
        group = settings.app_id("sender")
        watch = ProgressWatch(stall_seconds=3.0)
        lines: list[str] = []

        def flagged() -> bool:
            groups = {g.group: g for g in measure(settings)}
            stalled = watch.observe(list(groups.values()))
            lines[:] = lag_lines(list(groups.values()))
            return group in stalled

        try:
            wait_until("the sender group flagged stalled", flagged, services, timeout=90)
        except AssertionError:
            raise AssertionError("\n".join(lines)) from None
        out = subprocess.run([sys.executable, "-m", "services.pipeline.cli", "ops", "lag"],
                             env=services.env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    print(f"\n{broker_kind}: " + "\n".join(lines))
    sender_lines = "\n".join(lines[lines.index(next(x for x in lines if x.startswith(group))):][:2])
    assert "message(s) waiting and nothing consumed for" in sender_lines
    assert f"{group}  state=" in out.stdout
