"""`python -m benchmarks --quick` (what `make bench` runs) end to end: every figure beside its
raw baseline and ratio, on a fresh broker, the real services and postfix's smtp-sink."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = [
    "planner: send commands/s",
    "sender: emails/s, 1 process",
    "sender: emails/s, 2 processes",
    "sender: 2 processes / 1 process",
    "reconciler: outcomes/s into Postgres",
    "end to end: emails/s",
    "peak RSS planner",
    "peak RSS sender-1",
    "peak RSS sender-2",
    "peak RSS reconciler",
]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_quick_benchmark_prints_every_figure_with_its_baseline(
    tmp_path: Path, postgres_server: str, redis_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env |= {"DATABASE_URL": postgres_server, "REDIS_URL": redis_url,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--timeout", "300"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    table = output[output.index("== figures"):]
    for name in FIGURES:
        line = next((row for row in table.splitlines() if row.startswith(name)), None)
        assert line is not None, f"{name!r} missing from\n{table}"
    results = orjson.loads(next((tmp_path / ".bench").glob("*/results.json")).read_bytes())
    assert results["failed"] == []
    figures = {f["name"]: f for f in results["figures"]}
    assert len(figures) == len(FIGURES)
    for figure in figures.values():
        assert figure["value"] > 0 and figure["baseline"] > 0, figure
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
        assert figure["baseline_name"], figure
    assert results["machine"]["cores"] == str(os.cpu_count())
