"""The demo's pure parts: campaign, recipients, masking, settings round trip, poll view."""

from __future__ import annotations

import dataclasses

from services.pipeline.demo import (
    BOUNCE_ADDRESS,
    demo_campaign,
    demo_recipients,
    settings_env,
)
from services.pipeline.demo_progress import counts_of, failed_recipients
from services.pipeline.redaction import mask_email
from services.pipeline.settings import Settings


def test_recipients_end_with_the_bounce() -> None:
    recipients = demo_recipients(300)
    assert len(recipients) == 300
    assert recipients[0]["email"] == "demo-00001@example.com"
    assert recipients[-1]["email"] == BOUNCE_ADDRESS
    assert len({r["email"] for r in recipients}) == 300
    assert demo_recipients(1) == [{"email": BOUNCE_ADDRESS, "name": "Bounce Demo",
                                   "variables": {"n": 1}}]


def test_campaign_shape() -> None:
    campaign = demo_campaign("demo-20250101-000000-abcd")
    assert set(campaign) == {"campaign_id", "manager_id", "actor_id", "actor_role", "confirmed", "name",
                             "from", "template", "variables"}
    assert campaign["template"]["subject"] and campaign["template"]["text"]


def test_mask_email() -> None:
    assert mask_email("bounce-demo@example.com") == "b***@example.com"
    assert mask_email("not-an-address") == "***"


def test_settings_env_round_trips() -> None:
    settings = dataclasses.replace(
        Settings(), smtp_validate_certs=False, smtp_port=2600, broker_session_timeout=7.5,
        topic_prefix="demo-x.",
    )
    assert Settings.from_env(settings_env(settings)) == settings


def test_poll_view_parsing() -> None:
    view = {
        "status": "completed",
        "counts": {"total": 3, "pending": 0, "sent": 2, "failed": 1},
        "failed_recipients": [
            {"email": BOUNCE_ADDRESS, "smtp_code": 550, "smtp_reply": "5.1.1 mailbox unavailable"},
        ],
    }
    counts = counts_of(view)
    assert (counts["sent"], counts["failed"], counts["skipped"]) == (2, 1, 0)
    assert failed_recipients(view) == [(BOUNCE_ADDRESS, "550 5.1.1 mailbox unavailable")]
    assert counts_of(None)["total"] == 0
