"""Deterministic identifiers.

Contract: `send_id(campaign, email)` is the same for the same campaign and
recipient address (case and surrounding blanks ignored) in every process and
every replay, so a replayed start or chunk cannot mint a second send.
"""

from __future__ import annotations

import uuid

_SEND_NAMESPACE = uuid.UUID("6f1c1b55-2f0e-4a53-9a43-3c1f5f0f8e21")


def normalize_email(email: str) -> str:
    """The form of an address that identifies a recipient within a campaign."""
    return email.strip().lower()


def send_id(campaign_id: str, email: str) -> str:
    """The send id of (campaign, recipient)."""
    return str(uuid.uuid5(_SEND_NAMESPACE, f"{campaign_id}\n{normalize_email(email)}"))


def test_send_id(campaign_id: str, command_message_id: str) -> str:
    """The send id of one test-email command (replaying the command yields the same id)."""
    return str(uuid.uuid5(_SEND_NAMESPACE, f"{campaign_id}\ntest\n{command_message_id}"))


def message_id_header(send: str, domain: str) -> str:
    """The RFC 5322 Message-ID of a send: derived from the send id, so stable across retries."""
    return f"<{send}@{domain}>"
