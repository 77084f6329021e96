"""decide_step: one step up only with enough volume and both ratios under their thresholds."""

from __future__ import annotations

import pytest

from services.pipeline.accounts import WarmupPlan
from services.reconciler.warmup import decide_step

PLAN = WarmupPlan(daily_caps=(50, 100, 200, 400), max_bounce_ratio=0.05, max_deferral_ratio=0.10,
                  min_daily_volume=20)


@pytest.mark.parametrize(
    ("stage", "attempts", "bounces", "deferrals", "expected", "why"),
    [
        (0, 40, 0, 0, 1, "step up"),
        (1, 40, 2, 4, 2, "step up"),  # 5% bounces and 10% deferrals: at the thresholds is fine
        (1, 40, 3, 0, 1, "bounce ratio too high"),  # 7.5% > 5%
        (1, 40, 0, 5, 1, "deferral ratio too high"),  # 12.5% > 10%
        (1, 19, 0, 0, 1, "min_daily_volume"),
        (0, 0, 0, 0, 0, "min_daily_volume"),
        (3, 400, 0, 0, 3, "last step"),
        (7, 400, 0, 0, 3, "last step"),  # a stage beyond a shortened plan is clamped
    ],
)
def test_decide_step(stage: int, attempts: int, bounces: int, deferrals: int, expected: int,
                     why: str) -> None:
    new_stage, reason = decide_step(stage, PLAN, attempts, bounces, deferrals)
    assert new_stage == expected
    assert why in reason


def test_step_reason_names_the_new_cap_and_the_ratios() -> None:
    _, reason = decide_step(0, PLAN, 50, 1, 2)
    assert reason.startswith("step up to stage 1 (cap 100)")
    assert "bounce ratio 2.0%" in reason and "deferral ratio 4.0%" in reason


def test_zero_min_volume_steps_up_without_traffic() -> None:
    plan = WarmupPlan(daily_caps=(10, 20), min_daily_volume=0)
    assert decide_step(0, plan, 0, 0, 0)[0] == 1
