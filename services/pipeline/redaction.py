"""Keeping addresses and secrets out of logs, events and errors.

Contract: `mask_email("ivan@example.com")` is `"i***@example.com"`; anything
without an `@` becomes `"***"`. Every service masks recipient addresses with it
before they reach a log line or a printed summary.
"""

from __future__ import annotations


def mask_email(address: str) -> str:
    """An address fit for logs: the first character of the local part, then the domain."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"
