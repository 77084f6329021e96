"""The reconciler benchmark's messages and arithmetic (the run itself is `make bench`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from benchmarks.common import BenchError
from benchmarks.reconciler import (
    FAILED_EVERY,
    Applied,
    bench_recipients,
    campaign_definition,
    outcome_messages,
)
from services.pipeline.contract import encode
from services.pipeline.ids import send_id
from services.pipeline.publish import campaign_messages
from services.reconciler.projections import OUTCOME_STATUS
from services.reconciler.suppressions import is_hard_bounce

START = datetime(2026, 1, 1, tzinfo=UTC)


def test_campaign_is_a_valid_confirmed_start_and_its_chunks() -> None:
    messages = list(campaign_messages(campaign_definition(), bench_recipients(2500)))
    assert [m["kind"] for m in messages] == ["campaign.start"] + ["campaign.recipients"] * 3
    assert messages[0]["confirmed"] is True and messages[0]["total_recipients"] == 2500


def test_one_valid_outcome_per_recipient_mostly_sent() -> None:
    people = bench_recipients(4 * FAILED_EVERY)
    outcomes = list(outcome_messages("camp-1", "default", people, "mailer.local"))  # validates each
    assert [o["send_id"] for o in outcomes] == [send_id("camp-1", p["email"]) for p in people]
    assert all(o["kind"] in OUTCOME_STATUS for o in outcomes)
    failed = [o for o in outcomes if o["kind"] == "outcome.failed"]
    assert len(failed) == 4
    assert sum(is_hard_bounce(o) for o in failed) == 2
    assert all(o["error_class"] == "permanent" and o["smtp_code"] >= 500 for o in failed)
    assert len({o["message_id"] for o in outcomes}) == len(outcomes)
    assert max(len(encode(o)) for o in outcomes) < 1024


def test_rate_spans_every_batch_but_the_last_two() -> None:
    batches = [(START + timedelta(seconds=s), rows) for s, rows in ((0, 500), (1, 500), (2, 500), (3.5, 7))]
    applied = Applied(batches)
    assert (applied.outcomes, applied.timed, applied.seconds) == (1507, 1000, 2.0)
    assert applied.rate == 500.0


def test_two_batches_cannot_be_timed() -> None:
    applied = Applied([(START, 500), (START + timedelta(seconds=1), 300)])
    with pytest.raises(BenchError, match="too few"):
        _ = applied.rate
