"""A worker stopped by a signal exits within the deadline even when its stop hangs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HANGING_STOP = """
import logging, sys, time
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
from services.pipeline import faust_app
faust_app.SHUTDOWN_DEADLINE = 0.5
faust_app._exit_after_deadline()   # what DeadlineWorker does on SIGTERM
faust_app._exit_after_deadline()   # a second signal starts no second timer
time.sleep(30)                     # a stop that never finishes
"""


def test_a_stop_that_hangs_ends_the_process_at_the_deadline_with_status_1() -> None:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGING_STOP], cwd=ROOT, capture_output=True,
                          text=True, timeout=25)
    took = time.monotonic() - began
    assert done.returncode == 1, done.stderr
    assert took < 15, f"took {took:.1f}s"
    assert done.stderr.count("did not stop within 0.5 s of the signal") == 1, done.stderr
