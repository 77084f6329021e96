"""The plain-address fast path of the input checks gives email-validator's verdict (issue 7)."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from services.pipeline.input_checks import address_problem


def validator_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


EDGES = [
    "ann@example.com", "a.b-c_d+e@mail.example.co.uk", "x" * 64 + "@example.com",
    "x" * 65 + "@example.com", "a@" + "b" * 63 + ".com", "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["c" * 60] * 4) + ".com", "a@" + ".".join(["c" * 61] * 4) + ".com",
    "a..b@example.com", ".a@example.com", "a.@example.com", "a@example", "a@-x.com",
    "a@x-.com", "a@x..com", "a@example.local", "a@example.test", "a@localhost",
    "a@123.456", "a@example.123", "a@xn--80ak6aa92e.com", "a@xn--bad--.com",
    "a@EXAMPLE.COM", "A+tag@Example.Com", "a@example.com.", "a@_x.example.com",
]


@pytest.mark.parametrize("address", EDGES)
def test_edge_addresses_get_the_validator_s_verdict(address: str) -> None:
    assert (address_problem(address) is None) == validator_accepts(address)


_local = st.from_regex(r"[A-Za-z0-9_+.-]{1,70}", fullmatch=True)
_label = st.from_regex(r"[A-Za-z0-9-]{1,66}", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)


@settings(max_examples=500, deadline=None)
@given(local=_local, domain=_domain)
def test_any_plain_address_gets_the_validator_s_verdict(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert (address_problem(address) is None) == validator_accepts(address)
