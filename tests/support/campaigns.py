"""Campaign definitions and recipient lists for tests."""

from __future__ import annotations

from typing import Any


def campaign(campaign_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid campaign definition."""
    definition: dict[str, Any] = {
        "campaign_id": campaign_id,
        "manager_id": "manager-7",
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
    return definition


def recipients(n: int, domain: str = "example.com") -> list[dict[str, Any]]:
    """`n` distinct recipients with names and a per-recipient variable."""
    return [
        {"email": f"user{i:05d}@{domain}", "name": f"User {i}", "variables": {"code": f"C{i}"}}
        for i in range(n)
    ]
