"""Pure logic of the limiter's outside view (issue 14): the ETA (defect 15), the rebuild's times (9)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pytest import approx

from services.pipeline.clock import CompressedClock, SystemClock
from services.reconciler.eta import EtaInputs, estimate
from services.reconciler.limiter_state import CLAIM_SLACK, clock_seconds, restore_time

BURST = datetime(2026, 12, 6, 0, 16, 59, tzinfo=UTC)


def _finish(now: datetime, remaining: int, window: list[datetime], **extra: object) -> datetime | None:
    deferred_until = min(window) + timedelta(hours=1) if len(window) >= 120 else None
    return estimate(EtaInputs(now=now, remaining=remaining, hourly_rate=120, sent_last_hour=len(window),
                              window_sends=window, not_before=deferred_until, **extra)).finish_at  # type: ignore[arg-type]


def test_d15_finish_at_is_stable_across_polls_and_follows_the_tokens_real_expiry() -> None:
    # 120/h, a burst of 120 at 00:16:59, 280 left: 01:16:59 (120), 02:16:59 (120), 03:16:59 (40)
    first = [BURST] * 120
    polls = [
        _finish(BURST + timedelta(seconds=6), 280, first),        # 00:17:05
        _finish(datetime(2026, 12, 6, 0, 44, 57, tzinfo=UTC), 280, first),
        _finish(datetime(2026, 12, 6, 1, 16, 58, tzinfo=UTC), 280, first),
        # 01:16:59: the first burst's tokens came back and went out again at once
        _finish(datetime(2026, 12, 6, 1, 17, 30, tzinfo=UTC), 160, [BURST + timedelta(hours=1)] * 120),
    ]
    assert polls == [datetime(2026, 12, 6, 3, 16, 59, tzinfo=UTC)] * 4


def test_d15_the_first_burst_after_a_deferral_is_at_next_run_at() -> None:
    # sends spread over the last hour free one by one: the ETA uses each one's expiry
    now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    window = [now - timedelta(minutes=59, seconds=59) + timedelta(seconds=30 * i) for i in range(120)]
    finish = estimate(EtaInputs(now=now, remaining=10, hourly_rate=120, window_sends=window,
                                not_before=window[0] + timedelta(hours=1))).finish_at
    assert finish == window[9] + timedelta(hours=1)  # the 10th oldest token's return


def test_d15_campaigns_ahead_on_the_account_delay_the_finish() -> None:
    now = datetime(2026, 12, 6, 0, 0, tzinfo=UTC)
    alone = estimate(EtaInputs(now=now, remaining=60, hourly_rate=60)).finish_at
    behind = estimate(EtaInputs(now=now, remaining=60, hourly_rate=60, ahead=100)).finish_at
    assert alone == now
    # 100 of a higher-priority campaign first: 60 at 00:00, 60 at 01:00, 40 at 02:00 (ours last)
    assert behind == now + timedelta(hours=2)


def test_d9_restored_sends_never_free_before_their_reservation() -> None:
    clock = SystemClock()
    now = clock.time()
    occurred = datetime.fromtimestamp(now - 100, UTC)
    assert restore_time(clock, now, now - 200, now - 150, occurred) == approx(now - 100)  # outcome
    assert restore_time(clock, now, now - 200, now - 150, None) == approx(now - 150, abs=0.5)  # finish
    assert restore_time(clock, now, now - 200, None, None) == approx(now - 200 + CLAIM_SLACK, abs=0.5)
    assert restore_time(clock, now, now - 1, None, None) == now  # never in the future


def test_d9_claim_wall_times_are_read_on_the_pipeline_clock() -> None:
    start = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    import time

    wall = time.time()
    clock = CompressedClock(start, anchor=wall, speed=10)
    assert abs(clock_seconds(clock, wall - 5) - (clock.time() - 50)) < 1.0  # 5 wall s = 50 clock s
