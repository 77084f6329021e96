"""`mailer demo` end to end: embedded broker, real services, one bounced recipient."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_demo_sends_all_but_the_bounce(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "services.pipeline.cli", "demo", "--recipients", "300",
         "--no-progress", "--timeout", "240"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\s*recipients\s+300$", result.stdout, re.M), output
    assert re.search(r"^\s*sent\s+299$", result.stdout, re.M), output
    assert re.search(r"^\s*failed\s+1$", result.stdout, re.M), output
    assert "b***@example.com  550" in result.stdout, output
    assert "bounce-demo@example.com" not in result.stdout
    assert re.search(r"^metrics: planner http://127\.0\.0\.1:\d+/metrics, sender-1 http://\S+/metrics, "
                     r"reconciler http://\S+/metrics$", result.stdout, re.M), output
    assert list((tmp_path / ".demo").iterdir()), "no run directory"
