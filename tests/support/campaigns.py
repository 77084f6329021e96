"""Campaign definitions and recipient lists for tests."""

from __future__ import annotations

from typing import Any

from services.pipeline.contract import envelope, validate
from services.pipeline.ids import send_id


def campaign(campaign_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid campaign definition."""
    definition: dict[str, Any] = {
        "campaign_id": campaign_id,
        "manager_id": "manager-7",
        "actor_id": "manager-7",
        "actor_role": "manager",
        "name": "Spring sale",
        "from": {"email": "news@shop.example.com", "name": "Shop"},
        "template": {
            "subject": "Hello {{ name }}, spring sale",
            "text": "Dear {{ name }}, your code is {{ code }}.",
            "html": "<p>Dear {{ name }}, your code is <b>{{ code }}</b>.</p>",
        },
        "variables": {"code": "SPRING"},
    }
    definition.update(overrides)
    if "actor_id" not in overrides:
        definition["actor_id"] = definition["manager_id"]  # its own manager starts it
    return definition


def recipients(n: int, domain: str = "example.com") -> list[dict[str, Any]]:
    """`n` distinct recipients with names and a per-recipient variable."""
    return [
        {"email": f"user{i:05d}@{domain}", "name": f"User {i}", "variables": {"code": f"C{i}"}}
        for i in range(n)
    ]


def outcome(kind: str, campaign_id: str, email: str, code: int | None, reply: str,
            **extra: Any) -> dict[str, Any]:
    """A valid outcome of `kind` for one recipient, as the sender would publish it."""
    fields: dict[str, Any] = {
        "campaign_id": campaign_id, "send_id": send_id(campaign_id, email), "attempt": 1,
        "is_test": False, "account": "default", "recipient_email": email, "smtp_code": code,
        "smtp_reply": reply, "error_class": None if kind == "outcome.sent" else "permanent",
        "message_id_header": f"<{send_id(campaign_id, email)}@mailer.local>",
        "duration_ms": 3.0,
    }
    message = envelope(kind, **{**fields, **extra})
    return validate(message)


def send_email(
    recipient: dict[str, Any], *, campaign_id: str = "camp-1", **overrides: Any
) -> dict[str, Any]:
    """A valid `send.email` command, built the way the planner builds it."""
    from services.planner.plan_chunk import send_command

    definition = campaign(campaign_id)
    definition["from"] = {"email": "news@shop.example.com", "name": "Shop"}
    for field in ("template", "variables", "reply_to", "unsubscribe_url"):
        if field in overrides:
            definition[field] = overrides.pop(field)
    command = send_command(definition, recipient, send_id(campaign_id, recipient["email"]))
    command.update(overrides)
    return validate(command)
