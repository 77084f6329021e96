"""The pure rules behind the CRM's status events (issue 14, defects 3, 4 and 17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.pipeline.contract import validate
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.topics import Topic
from services.reconciler.deferrals import HELD, UNTIMED, wanted_state
from services.reconciler.projections import StatusChange
from services.reconciler.reason_texts import correction_texts, resumed_text
from services.reconciler.status_events import (
    COUNT_FIELDS,
    SETTLED,
    Announced,
    _event,
    _previous,
    _repeats,
    correction_for,
)

T = datetime(2026, 12, 6, 0, 19, 42, tzinfo=UTC)
COUNTS = dict.fromkeys(COUNT_FIELDS, 0) | {"total": 800, "sent": 64, "cancelled": 736}
LANDED = dict.fromkeys(COUNT_FIELDS, 0) | {"total": 800, "sent": 96, "cancelled": 704}


@pytest.mark.parametrize("held", HELD)
def test_d4_sends_held_by_a_pause_never_defer_a_sending_campaign(held: str) -> None:
    # the queue-state query leaves HELD rows out, so a resumed campaign with only those parked
    # has no reason; a deferral it showed for one is over even while released sends fly
    assert wanted_state("sending", held, T, None, None, waiting=True) == ("", None)
    # a real limit still defers it, and keeps it deferred while its released sends fly
    assert wanted_state("sending", "", None, "rate_per_hour", T, waiting=True) == ("rate_per_hour", T)
    assert wanted_state("sending", "rate_per_hour", T, None, None, waiting=True) == ("rate_per_hour", T)


@pytest.mark.parametrize("reason", UNTIMED)
def test_d17_a_quota_deferral_has_no_until(reason: str) -> None:
    # the parked rows are due at the limiter's next check; the campaign waits for a top-up
    next_check = T + timedelta(seconds=10)
    assert wanted_state("sending", "", None, reason, next_check, waiting=True) == (reason, None)
    assert wanted_state("sending", reason, None, reason, T + timedelta(seconds=20), waiting=True) == (
        reason, None)


def _deferral(reason: str, before: str = "sending") -> StatusChange:
    return StatusChange(campaign_id="c", before=before, after="deferred", actor="system", action="defer",
                        reason="text", reason_ru="текст", defer_reason=reason)


def test_d17_queue_events_are_not_repeated_and_previous_is_what_the_crm_read() -> None:
    deferred = Announced(3, "deferred", "rate_per_hour", COUNTS)
    sending = Announced(3, "sending", "", COUNTS)
    assert _repeats(_deferral("rate_per_hour", "deferred"), deferred)
    assert not _repeats(_deferral("outside_hours", "deferred"), deferred)
    assert not _repeats(_deferral("rate_per_hour"), sending)
    over = StatusChange(campaign_id="c", before="deferred", after="sending", actor="system",
                        action="deferral_over", reason="x")
    assert _repeats(over, sending) and not _repeats(over, deferred)
    # a campaign that waited completes, pauses or is cancelled: previous_status is deferred
    done = StatusChange(campaign_id="c", before="sending", after="completed", actor="system",
                        action="complete", reason="x")
    assert _previous(done, deferred) == "deferred"
    assert _previous(done, sending) == "sending"
    assert _previous(done, None) == "sending"
    # a command's own change is never swallowed as a repeat
    pause = StatusChange(campaign_id="c", before="sending", after="paused", actor="m", action="pause",
                         reason="x")
    assert not _repeats(pause, Announced(1, "paused", "", COUNTS))


def test_d3_a_settled_campaign_whose_counts_moved_gets_a_correction() -> None:
    cancelled = Announced(4, "cancelled", "", COUNTS)
    correction = correction_for("c", "cancelled", LANDED, cancelled)
    assert correction is not None
    assert (correction.before, correction.after, correction.correction, correction.actor) == (
        "cancelled", "cancelled", True, "system")
    assert correction.reason and correction.reason_ru
    event = validate(_event(correction, LANDED, 5, correction.before), Topic.CAMPAIGN_STATUS)
    assert (event["status"], event["previous_status"], event["sequence"], event["correction"]) == (
        "cancelled", "cancelled", 5, True)
    assert event["counts"] == LANDED
    # nothing moved, not settled, or never announced: no correction
    assert correction_for("c", "cancelled", COUNTS, cancelled) is None
    assert correction_for("c", "sending", LANDED, Announced(4, "sending", "", COUNTS)) is None
    assert correction_for("c", "cancelled", LANDED, None) is None
    assert set(SETTLED) == {"paused", "cancelled", "completed"}


def test_d17_deferral_and_return_texts_come_from_the_catalogue() -> None:
    assert resumed_text(DeferReason.QUOTA_EXHAUSTED, "ru") == (
        "Ожидание окончено (квота исчерпана): рассылка снова идёт.")
    assert resumed_text("rate_per_hour", "en") == "The wait is over (hourly limit): sending again."
    en, ru = correction_texts("paused")
    assert "Paused" in en and "Рассылка приостановлена" in ru
    with pytest.raises(ValueError):
        correction_texts("bogus")
    event = validate(_event(_deferral("quota_exhausted"), COUNTS, 2, "sending"), Topic.CAMPAIGN_STATUS)
    assert (event["reason_ru"], event["deferred_until"], "correction" in event) == ("текст", None, False)
