"""Hostile input at every ingress (R1): random and malicious messages on every topic a
service consumes are refused with a reason naming the field, never crash the decoder,
and good messages (internationalised addresses included) are still accepted."""

from __future__ import annotations

import copy
import string
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.pipeline import contract, input_checks
from services.pipeline.contract import InvalidMessage, Message
from services.pipeline.input_checks import MAX_MESSAGE_BYTES
from services.pipeline.settings import Settings
from services.pipeline.topics import REGISTRY, Topic, kind_topic
from services.sender.message import build_message
from services.sender.render import render_command
from tests.support.campaigns import send_email
from tests.support.contract_cases import example

#: The topics a service reads, and so the ingresses under attack.
INGRESS = (Topic.CAMPAIGN_COMMANDS, Topic.SEND_COMMANDS, Topic.SEND_OUTCOMES, Topic.SUPPRESSIONS)
KINDS = tuple(kind for topic in INGRESS for kind in REGISTRY[topic].kinds)
#: Fields whose values end up in a mail header.
HEADER_LEAVES = {"subject", "unsubscribe_url", "email", "name", "message_id_header", "recipient_email"}

GOOD_ADDRESSES = [
    "user@пример.рф", "user@bücher.de", "анна@пример.рф", "user+tag@example.com",
    "first.last@sub.example.co.uk", "x@xn--80ak6aa92e.com", "o'brien@example.ie", "a@b.co",
    "UPPER@EXAMPLE.COM", "user@例え.テスト.jp",
]
BAD_ADDRESSES = [
    "a@b", "a@-x.com", "a\r\nBcc: x@y.z@ex.com", "a..b@example.com", "a@example..com",
    ".a@example.com", "a.@example.com", "a@x_y.com", "a@example.com-", "a@[127.0.0.1]",
    '"quoted"@example.com', "a@localhost.localhost", "a@host.invalid", "a@exa mple.com",
    "a\x00@example.com", "a@example.com\x00", "a@1.2.3.4",
    f"a@{'b' * 64}.com", "a@@example.com", "a@example.c\u2028om",
]
HEADER_BREAKERS = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def verdict(raw: bytes | None, topic: Topic) -> Message | InvalidMessage:
    """The decoded message or the InvalidMessage; anything else fails the test."""
    try:
        message = contract.decode(raw, topic)
    except InvalidMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip(), "a refusal must say why"
        assert len(exc.reason) <= contract.MAX_REASON_CHARS
        assert exc.campaign_id is None or len(exc.campaign_id) <= 64
        return exc
    assert isinstance(message, dict)
    return message


def refused(raw: bytes | None, topic: Topic) -> str:
    result = verdict(raw, topic)
    assert isinstance(result, InvalidMessage), f"accepted: {raw!r:.300}"
    return result.reason


def accepted(message: Message) -> Message:
    result = verdict(contract.encode(message), kind_topic(message["kind"]))
    assert not isinstance(result, InvalidMessage), result.reason
    return result


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (keys and indexes) to a value inside `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from paths(item, (*prefix, index))


def parent(message: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        message = message[step]
    return message


def string_paths(message: Message) -> list[tuple[Any, ...]]:
    return [p for p in paths(message) if isinstance(parent(message, p)[p[-1]], str)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
safe_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
)
local_part = st.from_regex(r"[a-z0-9]([a-z0-9_+-]{0,15}[a-z0-9])?", fullmatch=True)
# "--" in the 3rd and 4th places is reserved for IDNA ("xn--"): such a label is not good
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda text: text[2:4] != "--") | st.sampled_from(
    ["пример", "bücher", "例え", "mañana", "xn--bcher-kva"])
good_address = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    local_part, st.lists(label, min_size=1, max_size=3), st.sampled_from(["com", "org", "ru", "рф", "de"]),
) | st.sampled_from(GOOD_ADDRESSES)
variables = st.dictionaries(
    st.text(string.ascii_letters + "_", min_size=1, max_size=20),
    st.none() | st.booleans() | st.integers(-(2**31), 2**31)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)
    | st.floats(allow_nan=False, allow_infinity=False),
    max_size=8,
)


# --- anything at all --------------------------------------------------------------------

@SETTINGS
@given(raw=st.binary(max_size=2000), topic=st.sampled_from(INGRESS))
def test_random_bytes_are_refused_with_a_reason_never_a_crash(raw: bytes, topic: Topic) -> None:
    verdict(raw, topic)


@SETTINGS
@given(value=json_values, topic=st.sampled_from(INGRESS))
def test_random_json_is_refused_with_a_reason(value: Any, topic: Topic) -> None:
    refused(orjson.dumps(value), topic)


@SETTINGS
@given(fields=st.dictionaries(st.text(max_size=20), json_values, max_size=8),
       kind=st.sampled_from(KINDS))
def test_random_objects_of_a_known_kind_are_refused(fields: dict[str, Any], kind: str) -> None:
    fields.update(kind=kind, schema_version=1)
    refused(orjson.dumps(fields), kind_topic(kind))


@pytest.mark.parametrize("topic", INGRESS)
def test_null_and_non_bytes_values_are_refused(topic: Topic) -> None:
    assert "null value" in refused(None, topic)
    assert "must be bytes" in refused("{}", topic)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", INGRESS)
def test_a_message_over_the_size_limit_is_refused_before_parsing(topic: Topic) -> None:
    raw = b"{" + b" " * MAX_MESSAGE_BYTES  # not JSON either: it must never be parsed
    reason = refused(raw, topic)
    assert f"at most {MAX_MESSAGE_BYTES} bytes" in reason
    assert "JSON" not in reason


def test_a_valid_message_just_over_the_limit_is_refused_and_one_under_it_accepted() -> None:
    message = example("campaign.start")
    message["template"]["text"] = message["template"]["html"] = ""
    room = MAX_MESSAGE_BYTES - len(contract.encode(message))
    message["template"]["text"] = "x" * (room // 2)
    message["template"]["html"] = "y" * (room - room // 2)
    assert len(contract.encode(message)) == MAX_MESSAGE_BYTES
    accepted(message)
    message["template"]["text"] += "x"
    assert "bytes are accepted" in refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000])
def test_deeply_nested_json_is_refused(raw: bytes) -> None:
    refused(raw, Topic.CAMPAIGN_COMMANDS)


# --- valid messages, mutated ------------------------------------------------------------

@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_removing_a_required_field_is_refused(kind: str, data: st.DataObject) -> None:
    message = example(kind)
    field = data.draw(st.sampled_from(contract.load_schema(kind)["required"]))
    del message[field]
    refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), name=st.text(min_size=1, max_size=30), value=json_values)
def test_an_unknown_field_is_refused_and_named(kind: str, name: str, value: Any) -> None:
    message = example(kind)
    assume(name not in contract.load_schema(kind)["properties"])
    message[name] = value
    reason = refused(contract.encode(message), kind_topic(kind))
    assert kind in reason


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(), value=json_values)
def test_any_field_of_another_type_never_crashes(kind: str, data: st.DataObject, value: Any) -> None:
    message = example(kind)
    path = data.draw(st.sampled_from(list(paths(message))))
    parent(message, path)[path[-1]] = value
    verdict(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), field=st.sampled_from(
    ["kind", "schema_version", "message_id", "occurred_at"]), value=json_values)
def test_a_broken_envelope_is_refused(kind: str, field: str, value: Any) -> None:
    message = example(kind)
    assume(value != message[field])
    assume(field != "message_id" or not (isinstance(value, str) and 1 <= len(value) <= 128))
    message[field] = value
    refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(), at=st.integers(0, 1000))
def test_nul_in_any_string_is_refused(kind: str, data: st.DataObject, at: int) -> None:
    message = example(kind)
    path = data.draw(st.sampled_from(string_paths(message)))
    holder = parent(message, path)
    value = holder[path[-1]]
    holder[path[-1]] = value[: at % (len(value) + 1)] + "\x00" + value[at % (len(value) + 1):]
    refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_nul_in_a_variable_name_is_refused(kind: str, data: st.DataObject) -> None:
    message = example(kind)
    holders = [p for p in paths(message) if p[-1] == "variables"]
    assume(holders)
    path = data.draw(st.sampled_from(holders))
    parent(message, path)[path[-1]]["bad\x00name"] = "x"
    assert "NUL" in refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(), breaker=st.sampled_from(HEADER_BREAKERS),
       injected=st.sampled_from(["Bcc: evil@attacker.example", "", "X-Injected: 1"]))
def test_a_line_break_in_a_header_value_is_refused(
    kind: str, data: st.DataObject, breaker: str, injected: str
) -> None:
    message = example(kind)
    headers = [p for p in string_paths(message)
               if p[-1] in HEADER_LEAVES and "variables" not in p and "command" not in p
               and p != ("name",)]  # the campaign's own name is no header
    assume(headers)
    path = data.draw(st.sampled_from(headers))
    holder = parent(message, path)
    holder[path[-1]] = holder[path[-1]] + breaker + injected
    refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_an_oversized_string_anywhere_is_refused(kind: str, data: st.DataObject) -> None:
    message = example(kind)
    path = data.draw(st.sampled_from(string_paths(message)))
    parent(message, path)[path[-1]] = "x" * (MAX_MESSAGE_BYTES + 1)
    refused(contract.encode(message), kind_topic(kind))


@SETTINGS
@given(topic=st.sampled_from(INGRESS), kind=st.text(max_size=80))
def test_an_unknown_kind_is_refused_and_named(topic: Topic, kind: str) -> None:
    assume(kind not in REGISTRY[topic].kinds)
    message = example(REGISTRY[topic].kinds[0])
    message["kind"] = kind
    reason = refused(contract.encode(message), topic)
    assert "unknown kind" in reason or "match" in reason


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(),
       value=st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                       st.integers(min_value=2**31, max_value=2**63 - 1),
                       st.integers(min_value=-(2**63), max_value=-1)))
def test_integer_fields_out_of_range_or_fractional_are_refused(
    kind: str, data: st.DataObject, value: float
) -> None:
    message = example(kind)
    fields = [f for f in ("priority", "attempt", "total_recipients", "total_chunks",
                          "chunk_index", "rate_per_hour", "smtp_code") if f in message]
    assume(fields)
    field = data.draw(st.sampled_from(fields))
    message[field] = value
    refused(contract.encode(message), kind_topic(kind))


def test_an_integral_float_is_not_an_integer() -> None:
    message = example("send.email")
    message["attempt"] = 1.0
    assert "attempt: must be an integer" in refused(contract.encode(message), Topic.SEND_COMMANDS)


# --- addresses --------------------------------------------------------------------------

ADDRESS_SLOTS = [
    ("campaign.recipients", ("recipients", 1, "email"), "recipients[1].email"),
    ("campaign.start", ("from", "email"), "from.email"),
    ("campaign.start", ("reply_to", "email"), "reply_to.email"),
    ("campaign.test_email", ("to", "email"), "to.email"),
    ("send.email", ("recipient", "email"), "recipient.email"),
    ("send.email", ("from", "email"), "from.email"),
    ("suppression.add", ("email",), "email"),
    ("suppression.remove", ("email",), "email"),
    ("outcome.sent", ("recipient_email",), "recipient_email"),
    ("outcome.deferred", ("recipient_email",), "recipient_email"),
]


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
@pytest.mark.parametrize(("kind", "path", "named"), ADDRESS_SLOTS)
def test_internationalised_addresses_are_accepted_everywhere(
    kind: str, path: tuple[Any, ...], named: str, address: str
) -> None:
    message = example(kind)
    parent(message, path)[path[-1]] = address
    accepted(message)


@pytest.mark.parametrize("address", BAD_ADDRESSES)
@pytest.mark.parametrize(("kind", "path", "named"), ADDRESS_SLOTS)
def test_bad_addresses_are_refused_naming_the_field(
    kind: str, path: tuple[Any, ...], named: str, address: str
) -> None:
    message = example(kind)
    parent(message, path)[path[-1]] = address
    reason = refused(contract.encode(message), kind_topic(kind))
    assert named in reason or "email must match" in reason or "must be shorter" in reason


def test_the_reason_names_the_recipient_and_why() -> None:
    message = example("campaign.recipients")
    message["recipients"] = [{"email": f"user{i}@example.com"} for i in range(5)]
    message["recipients"][3]["email"] = "a@-x.com"
    reason = refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    assert reason.startswith("campaign.recipients: recipients[3].email: not a valid address: ")
    assert "hyphen" in reason


@SETTINGS
@given(addresses=st.lists(good_address, min_size=1, max_size=20), names=st.lists(safe_text, max_size=20),
       variables=st.lists(variables, max_size=20))
def test_good_chunks_are_accepted(
    addresses: list[str], names: list[str], variables: list[dict[str, Any]]
) -> None:
    recipients: list[dict[str, Any]] = [{"email": a} for a in addresses]
    for recipient, name in zip(recipients, names, strict=False):
        recipient["name"] = name
    for recipient, values in zip(recipients, variables, strict=False):
        recipient["variables"] = values
    message = example("campaign.recipients")
    message["recipients"] = recipients
    accepted(message)


@SETTINGS
@given(address=good_address, name=safe_text, subject=safe_text, values=variables)
def test_good_send_commands_are_accepted(address: str, name: str, subject: str,
                                         values: dict[str, Any]) -> None:
    message = example("send.email")
    message["recipient"] = {"email": address, "name": name, "variables": values}
    message["template"]["subject"] = subject
    message["variables"] = values
    accepted(message)


def test_every_example_is_still_accepted() -> None:
    for kind in KINDS:
        accepted(example(kind))


# --- limits the schema cannot say -------------------------------------------------------

def test_header_injection_reasons_name_the_field() -> None:
    message = example("campaign.start")
    message["template"]["subject"] = "Sale\u2028Bcc: victim@example.org"
    reason = refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    assert reason == ("campaign.start: template.subject: contains a line break, NUL or control "
                      "character (header injection)")
    message = example("campaign.recipients")
    message["recipients"][1]["name"] = "John\x0bBcc: victim@example.org"
    assert "recipients[1].name: contains a line break" in refused(
        contract.encode(message), Topic.CAMPAIGN_COMMANDS)


def test_too_many_or_too_large_variables_are_refused() -> None:
    message = example("campaign.recipients")
    message["recipients"][0]["variables"] = {f"v{i}": i for i in range(input_checks.MAX_VARIABLES + 1)}
    assert "recipients[0].variables: 201 variables" in refused(
        contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    message["recipients"][0]["variables"] = {"big": "x" * input_checks.MAX_VARIABLES_BYTES}
    assert "bytes of variables" in refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    message["recipients"][0]["variables"] = {"n" * 129: 1}
    assert "variable name" in refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    message = example("send.email")
    message["variables"] = {"big": "x" * input_checks.MAX_VARIABLES_BYTES}
    assert "send.email: variables:" in refused(contract.encode(message), Topic.SEND_COMMANDS)


def test_more_chunks_than_recipients_is_refused() -> None:
    message = example("campaign.start")
    message["total_chunks"] = message["total_recipients"] + 1
    assert "total_chunks" in refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)


def test_an_unknown_time_zone_is_refused() -> None:
    for zone in ("../../../etc/passwd", "Mars/Olympus_Mons", "/etc/localtime"):
        message = example("send.email")
        message["working_hours"] = {"hours": "09:00-18:00", "time_zone": zone}
        assert "time_zone" in refused(contract.encode(message), Topic.SEND_COMMANDS)
    message["working_hours"] = {"hours": "09:00-18:00", "time_zone": "Asia/Vladivostok"}
    accepted(message)


def test_an_oversized_smtp_reply_is_refused() -> None:
    message = example("outcome.failed")
    message["smtp_reply"] = "5" * (input_checks.MAX_SMTP_REPLY_CHARS + 1)
    assert "smtp_reply" in refused(contract.encode(message), Topic.SEND_OUTCOMES)


@pytest.mark.parametrize(("change", "named"), [
    ({"kind": "campaign.start"}, "command.kind"),
    ({"send_id": "00000000-0000-5000-8000-000000000000"}, "command.send_id"),
    ({"campaign_id": "another"}, "command.campaign_id"),
    ({"priority": 99}, "command.priority"),
    ({"priority": "high"}, "command.priority"),
    ({"queued_at": "yesterday"}, "command.queued_at"),
])
def test_the_command_of_a_deferred_outcome_must_be_its_send(change: dict[str, Any], named: str) -> None:
    message = example("outcome.deferred")
    message["command"].update(change)
    assert named in refused(contract.encode(message), Topic.SEND_OUTCOMES)


def test_a_hostile_campaign_id_is_not_carried_to_the_dead_letter() -> None:
    message = example("campaign.pause")
    message["campaign_id"] = "x" * 100_000
    with pytest.raises(InvalidMessage) as err:
        contract.decode(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    assert err.value.campaign_id is None
    message = example("campaign.pause")
    message["actor_id"] = "bad actor"
    with pytest.raises(InvalidMessage) as err:
        contract.decode(contract.encode(message), Topic.CAMPAIGN_COMMANDS)
    assert err.value.campaign_id == "spring-sale-2026"


def test_a_huge_unknown_kind_gives_a_short_reason() -> None:
    message = example("campaign.pause")
    message["kind"] = "k" * 200_000
    assert len(refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)) < 300
    message = example("campaign.pause")
    for i in range(3000):
        message[f"extra-field-{i}"] = i
    assert len(refused(contract.encode(message), Topic.CAMPAIGN_COMMANDS)) <= contract.MAX_REASON_CHARS


# --- the sender: variables cannot inject headers into the rendered message --------------

@pytest.mark.parametrize("breaker", [b for b in HEADER_BREAKERS if b != "\x00"] + ["\x1e", "\x01"])
def test_a_variable_cannot_inject_a_header_through_the_subject(breaker: str) -> None:
    """(NUL never gets past the ingress: test_nul_in_any_string_is_refused.)"""
    payload = f"Sale{breaker}Bcc: evil@attacker.example{breaker}{breaker}body"
    command = send_email(
        {"email": "anna@example.com", "name": "Anna", "variables": {"promo": payload}},
        template={"subject": "Hi {{ name }}: {{ promo }}", "text": "{{ promo }}"},
        unsubscribe_url="https://shop.example.com/u?p={{ promo | urlencode }}",
    )
    rendered = render_command(command)
    assert rendered.subject.splitlines() == [rendered.subject]
    raw = build_message(command, rendered, Settings()).as_bytes()
    parsed = message_from_bytes(raw)
    assert parsed["Bcc"] is None
    assert "evil@attacker.example" not in (parsed["To"] or "")
    headers = set(parsed.keys())
    assert headers <= {"From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe",
                       "List-Unsubscribe-Post", "MIME-Version", "Content-Type",
                       "Content-Transfer-Encoding"}
    for name, value in parsed.items():
        assert "\n" not in str(value).replace("\n ", "").replace("\n\t", ""), name


@SETTINGS
@given(value=st.text(max_size=120))
def test_no_variable_value_breaks_the_subject_line(value: str) -> None:
    assume("\x00" not in value)
    command = send_email({"email": "anna@example.com", "variables": {"v": value}},
                         template={"subject": "S {{ v }} E", "text": "t"})
    rendered = render_command(command)
    assert len(rendered.subject.splitlines()) <= 1
    message = build_message(command, rendered, Settings())
    parsed = message_from_bytes(message.as_bytes())
    assert parsed["Bcc"] is None and parsed["Cc"] is None
    assert len(parsed.get_all("Subject") or []) == 1


def test_mutations_do_not_touch_the_examples() -> None:
    before = copy.deepcopy(example("send.email"))
    message = example("send.email")
    message["recipient"]["email"] = "x"
    assert example("send.email") == before


def test_a_deeply_nested_free_form_command_is_refused() -> None:
    message = example("outcome.deferred")
    head, _, tail = contract.encode(message).partition(b'"command":{')
    nested = head + b'"command":{' + b'"n":{' * 1000 + b'"s":"x"' + b"}" * 1000 + b"," + tail
    reason = refused(nested, Topic.SEND_OUTCOMES)
    assert "nested more than 32 levels" in reason
