"""The Prometheus alert rules are valid, tested by promtool, and each one is documented (R24).

Contract: `promtool check rules` accepts deploy/prometheus/alerts.yml and
`promtool test rules` passes deploy/prometheus/alerts_test.yml; a missing
promtool fails the test (run `make tools`), it never skips. Every alert has a
promtool case where it fires and one where it must not, a `severity` of
warning or critical, and `summary`, `description` and `runbook` annotations,
the runbook being a section of docs/ONCALL_PLAYBOOK.md.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = Path("deploy/prometheus/alerts.yml")
RULE_TESTS = Path("deploy/prometheus/alerts_test.yml")
PLAYBOOK_SECTIONS = {
    f"docs/ONCALL_PLAYBOOK.md#{anchor}"
    for anchor in (
        "sending-stalled", "quota-exhausted", "redis-down", "campaign-stuck", "consumer-lag-growing",
        "consumer-group-stalled",
        "dead-letters-appearing", "circuit-breaker-open", "queue-too-deep", "failure-ratio-high",
    )
}


def promtool(*args: str) -> None:
    """Run promtool from the repository root; fail with its output unless it exits 0."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: run `make tools` (Debian package prometheus)")
    result = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def load(path: Path) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules() -> None:
    promtool("check", "rules", str(RULES))


def test_promtool_rule_tests_pass() -> None:
    promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_firing_and_a_silent_test_case() -> None:
    cases = [case for group in load(RULE_TESTS)["tests"] for case in group.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alerts()}
    assert names, f"no alerts in {RULES}"
    assert names - firing == set(), "alerts no promtool case expects to fire"
    assert names - silent == set(), "alerts no promtool case expects to stay quiet"
    assert (firing | silent) - names == set(), "promtool cases of alerts that do not exist"


def test_every_alert_has_a_severity_and_a_runbook() -> None:
    for rule in alerts():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name} has no {key} annotation"
        assert annotations["runbook"] in PLAYBOOK_SECTIONS, f"{name}: runbook {annotations['runbook']!r}"
