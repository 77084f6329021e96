"""The sender's per-send truth in pure logic (issue 14, defects 6 and 13).

- 6: addresses go on the wire with their domain as IDNA A-labels (RFC 5891);
  only a non-ASCII local part needs SMTPUTF8.
- 13: the sender takes the claim before it asks the limiter: a refused or
  redelivered command never reserves and never refunds; a parked one gives
  its claim back. (The real components: tests/integration/test_outside_sender_truth.py.)
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from services.pipeline.contract import encode
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.settings import Settings
from services.sender.app import SenderRuntime
from services.sender.claims import Refusal, Superseded
from services.sender.message import MessageError, build_message, needs_smtputf8, smtp_address
from services.sender.raw_message import RawMessage
from services.sender.render import render_command
from services.sender.send_gate import Parked
from tests.support.campaigns import outcome, send_email

SETTINGS = replace(Settings(), message_id_domain="mail.shop.example.com")


# --- defect 6 --------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "wire"), [
    ("ivan@пример.рф", "ivan@xn--e1afmkfd.xn--p1ai"),
    ("hans@münchen.de", "hans@xn--mnchen-3ya.de"),
    ("hans@München.DE", "hans@xn--mnchen-3ya.de"),  # UTS #46 maps case
    ("straße@faß.de", "straße@xn--fa-hia.de"),  # non-transitional: ß stays ß (IDNA2008)
    ("иван@пример.рф", "иван@xn--e1afmkfd.xn--p1ai"),  # the local part is left as it is
    ("ann@example.com", "ann@example.com"),
    ("ann@xn--e1afmkfd.xn--p1ai", "ann@xn--e1afmkfd.xn--p1ai"),
])
def test_d6_smtp_address_writes_the_domain_as_a_labels(address: str, wire: str) -> None:
    assert smtp_address(address) == wire


def test_d6_a_domain_that_is_no_idn_is_an_invalid_address() -> None:
    with pytest.raises(MessageError, match="internationalised domain"):
        smtp_address("ann@exa\u200dmple.рф")  # a joiner where IDNA forbids it


def test_d6_only_a_non_ascii_local_part_needs_smtputf8() -> None:
    assert not needs_smtputf8("ivan@пример.рф")
    assert not needs_smtputf8("hans@münchen.de")
    assert needs_smtputf8("иван@пример.рф")


def test_d6_unicode_domains_build_a_plain_ascii_message() -> None:
    cmd = send_email({"email": "ivan@пример.рф", "name": "Иван", "variables": {}},
                     template={"subject": "Hi", "text": "Hello"}, variables={},
                     reply_to={"email": "help@магазин.рф", "name": "Help"})
    cmd["from"] = {"email": "news@магазин.рф", "name": "Магазин"}
    message = build_message(cmd, render_command(cmd), SETTINGS)
    assert isinstance(message, RawMessage)  # the fast path: 7-bit, no SMTPUTF8 needed
    message.as_bytes().decode("ascii")
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "ivan@xn--e1afmkfd.xn--p1ai"
    assert parsed["To"].addresses[0].display_name == "Иван"
    assert parsed["From"].addresses[0].addr_spec == "news@xn--80aairftm.xn--p1ai"
    assert parsed["Reply-To"].addresses[0].addr_spec == "help@xn--80aairftm.xn--p1ai"


# --- defect 13 -------------------------------------------------------------------------------

class Untouchable:
    """A limiter a redelivered or refused command must never reach."""

    async def refund(self, request: Any) -> None:
        raise AssertionError("a refund")

    async def reserve(self, request: Any) -> None:
        raise AssertionError("a reservation")


@dataclass
class Gate:
    """A send gate that counts its calls; it parks when told to."""

    park: bool = False
    calls: int = 0
    limiter: Untouchable = field(default_factory=Untouchable)

    async def admit(self, command: dict[str, Any]) -> Parked:
        self.calls += 1
        if not self.park:
            raise AssertionError("the gate was asked")
        return Parked(DeferReason.RATE_PER_HOUR, datetime(2026, 12, 6, 1, tzinfo=UTC))


@dataclass
class Claimed:
    """A claim that records what the sender did with it."""

    released: int = 0
    finished: int = 0

    async def release(self) -> None:
        self.released += 1

    async def finish(self, *args: Any) -> Superseded | None:
        self.finished += 1
        return None


@dataclass
class FakeClaims:
    """Claims answering every command with `verdict`."""

    verdict: Any

    @contextlib.asynccontextmanager
    async def hold(self, command: dict[str, Any]) -> AsyncIterator[Any]:
        yield self.verdict


def runtime() -> SenderRuntime:
    return SenderRuntime(SETTINGS)


def command() -> dict[str, Any]:
    return send_email({"email": "ann@example.com", "name": "Ann", "variables": {}})


async def test_d13_a_redelivered_finished_send_repeats_its_outcome_without_the_limiter() -> None:
    cmd = command()
    first = outcome("outcome.sent", cmd["campaign_id"], "ann@example.com", 250, "2.0.0 Ok")
    gate = Gate()
    claims = FakeClaims(Refusal("duplicate", "attempt 1 was claimed", encode(first)))
    repeated = await runtime()._send(cmd, gate, claims, None, time.monotonic())  # type: ignore[arg-type]
    assert repeated == first and gate.calls == 0


@pytest.mark.parametrize("reason", ["duplicate", "paused", "cancelled", "breaker", "suppressed"])
async def test_d13_a_refused_claim_never_reaches_the_limiter(reason: str) -> None:
    gate = Gate()
    answer = await runtime()._send(command(), gate, FakeClaims(Refusal(reason, "no")),  # type: ignore[arg-type]
                                   None, time.monotonic())  # type: ignore[arg-type]
    assert gate.calls == 0
    assert answer["kind"] in ("outcome.skipped", "outcome.deferred")


async def test_d13_a_parked_send_gives_its_claim_back_and_sends_nothing() -> None:
    gate, claim = Gate(park=True), Claimed()
    answer = await runtime()._send(command(), gate, FakeClaims(claim), None,  # type: ignore[arg-type]
                                   time.monotonic())
    assert answer["kind"] == "outcome.deferred" and answer["defer_reason"] == "rate_per_hour"
    assert (gate.calls, claim.released, claim.finished) == (1, 1, 0)


async def test_d5_an_error_after_the_claim_is_recorded_in_it_not_left_to_the_sweep() -> None:
    """A claimed send that fails unexpectedly publishes `failed/internal` and records it in the
    claim, so the stale-claim sweep never adds an `outcome.unknown` after it."""

    class Broken(Gate):
        async def admit(self, command: dict[str, Any]) -> Parked:
            raise RuntimeError("the gate broke")

    claim = Claimed()
    answer = await runtime()._send(command(), Broken(), FakeClaims(claim), None,  # type: ignore[arg-type]
                                   time.monotonic())
    assert answer["kind"] == "outcome.failed" and answer["error_class"] == "internal"
    assert (claim.released, claim.finished) == (0, 1)


async def test_d5_a_claim_the_sweep_settled_first_repeats_the_sweeps_outcome() -> None:
    cmd = command()
    swept = outcome("outcome.unknown", cmd["campaign_id"], "ann@example.com", None, "",
                    error_class="claim_timeout", reason="never finished")

    @dataclass
    class Late(Claimed):
        async def finish(self, *args: Any) -> Superseded | None:
            return Superseded(encode(swept))

    rt = runtime()
    answer = await rt._finish(Late(), cmd, outcome(  # type: ignore[arg-type]
        "outcome.sent", cmd["campaign_id"], "ann@example.com", 250, "ok"), time.monotonic())
    assert answer == swept
