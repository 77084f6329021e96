"""Accounts configuration: the default account, the accounts file, routing, throttles, secrets."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.pipeline.accounts import (
    DEFAULT_ACCOUNT,
    Account,
    Accounts,
    AccountsError,
    DomainThrottle,
    QuotaSource,
    WarmupPlan,
    load_accounts,
    parse_accounts,
)
from services.pipeline.settings import Settings
from services.pipeline.working_hours import WorkingHours

SECRET = "s3cr3t-Pa55-do-not-leak"
QUOTA_SECRET = "qk-7f1e-do-not-leak"


def full_document() -> dict[str, Any]:
    """An accounts file with two accounts, routes, a default, throttles, warm-up and quota."""
    return {
        "accounts": {
            "main": {
                "host": "smtp.main.example.com",
                "port": 587,
                "tls": "starttls",
                "username": "mailer@main.example.com",
                "password_env": "TEST_MAIN_SMTP_PASSWORD",
                "hourly_rate": 300,
                "daily_limit_per_manager": 2000,
                "working_hours": {"hours": "08:00-20:00", "days": "1-6", "time_zone": "Europe/Berlin"},
                "quota": {"url": "https://api.smtp.example/v1/user", "api_key_env": "TEST_MAIN_QUOTA_KEY",
                          "interval": 30},
                "domain_throttles": {
                    "google": {"domains": ["gmail.com", "GoogleMail.com"], "per_hour": 50},
                    "yandex": {"domains": ["yandex.ru", "ya.ru"], "per_hour": 80},
                },
                "warmup": {"daily_caps": [50, 100, 200], "max_bounce_ratio": 0.03,
                           "max_deferral_ratio": 0.2, "min_daily_volume": 10},
            },
            "bulk": {
                "host": "smtp.bulk.example.com",
                "tls": "tls",
                "password_file": "/nonexistent/bulk-password",
                "working_hours": {"hours": "10:00-17:00"},
                "quota": {"url": "https://bulk.example/quota", "api_key_file": "/nonexistent/key"},
            },
        },
        "routes": {"manager-1": "bulk", "manager-2": "main"},
        "default_account": "main",
    }


def settings(**overrides: Any) -> Settings:
    return replace(Settings(), **overrides)


# --- the default account, without a file ------------------------------------------------


def test_load_accounts_without_file_is_the_default_account_of_the_settings() -> None:
    s = settings(
        smtp_host="relay.example.com", smtp_port=465, smtp_tls="tls", smtp_username="robot",
        smtp_password=SECRET, hourly_rate=42, daily_limit_per_manager=7,
        working_hours="10:00-16:30", working_days="1,3,5", time_zone="Asia/Tokyo",
        quota_url="https://quota.example/api", quota_api_key=QUOTA_SECRET, quota_sync_interval=15.0,
    )
    accounts = load_accounts(s)
    assert list(accounts.by_name) == [DEFAULT_ACCOUNT]
    assert accounts.default == DEFAULT_ACCOUNT
    assert dict(accounts.routes) == {}
    account = accounts.get(DEFAULT_ACCOUNT)
    assert account is not None
    assert (account.name, account.host, account.port, account.tls, account.username) == (
        "default", "relay.example.com", 465, "tls", "robot")
    assert account.password() == SECRET
    assert (account.hourly_rate, account.daily_limit_per_manager) == (42, 7)
    assert account.working_hours == WorkingHours.parse("10:00-16:30", "1,3,5", "Asia/Tokyo")
    assert account.time_zone == "Asia/Tokyo"
    assert account.quota is not None
    assert (account.quota.account, account.quota.url, account.quota.interval) == (
        "default", "https://quota.example/api", 15.0)
    assert account.quota.api_key() == QUOTA_SECRET
    assert account.domain_throttles == ()
    assert account.warmup is None
    assert accounts.get("other") is None


def test_default_account_without_quota_url_has_no_quota_source() -> None:
    account = load_accounts(settings(quota_api_key=QUOTA_SECRET)).by_name[DEFAULT_ACCOUNT]
    assert account.quota is None


def test_default_account_secrets_come_from_their_files_first(tmp_path: Path) -> None:
    password = tmp_path / "smtp-password"
    key = tmp_path / "quota-key"
    password.write_text(SECRET + "\n", encoding="utf-8")
    key.write_text(QUOTA_SECRET + "\n", encoding="utf-8")
    s = settings(smtp_password="from-env", smtp_password_file=str(password),
                 quota_url="https://q.example", quota_api_key="from-env", quota_api_key_file=str(key))
    account = load_accounts(s).by_name[DEFAULT_ACCOUNT]
    assert account.password() == SECRET
    assert account.quota is not None and account.quota.api_key() == QUOTA_SECRET


@pytest.mark.parametrize(
    ("field", "value"),
    [("working_hours", "18:00-09:00"), ("working_days", "8"), ("time_zone", "Mars/Olympus")],
)
def test_default_account_with_bad_working_hours_names_the_settings(field: str, value: str) -> None:
    with pytest.raises(AccountsError, match="MAILER_WORKING_HOURS/DAYS/TIME_ZONE"):
        load_accounts(settings(**{field: value}))


# --- a full accounts document -------------------------------------------------------------


def test_parse_full_document() -> None:
    s = settings(hourly_rate=11, daily_limit_per_manager=22, smtp_port=2525, quota_sync_interval=90.0)
    accounts = parse_accounts(full_document(), s)
    assert set(accounts.by_name) == {"main", "bulk"}
    assert dict(accounts.routes) == {"manager-1": "bulk", "manager-2": "main"}
    assert accounts.default == "main"

    main = accounts.by_name["main"]
    assert (main.name, main.host, main.port, main.tls, main.username) == (
        "main", "smtp.main.example.com", 587, "starttls", "mailer@main.example.com")
    assert (main.hourly_rate, main.daily_limit_per_manager) == (300, 2000)
    assert main.working_hours == WorkingHours.parse("08:00-20:00", "1-6", "Europe/Berlin")
    assert main.time_zone == "Europe/Berlin"
    assert main.quota is not None
    assert (main.quota.account, main.quota.url, main.quota.interval) == (
        "main", "https://api.smtp.example/v1/user", 30.0)
    assert set(main.domain_throttles) == {
        DomainThrottle("google", frozenset({"gmail.com", "googlemail.com"}), 50),
        DomainThrottle("yandex", frozenset({"yandex.ru", "ya.ru"}), 80),
    }
    assert main.warmup == WarmupPlan((50, 100, 200), 0.03, 0.2, 10)

    bulk = accounts.by_name["bulk"]
    # missing fields come from the settings
    assert (bulk.port, bulk.tls, bulk.username) == (2525, "tls", "")
    assert (bulk.hourly_rate, bulk.daily_limit_per_manager) == (11, 22)
    # working hours: given hours, the settings' days and zone
    assert bulk.working_hours == WorkingHours.parse("10:00-17:00", s.working_days, s.time_zone)
    assert bulk.quota is not None and bulk.quota.interval == 90.0
    assert bulk.domain_throttles == ()
    assert bulk.warmup is None


def test_warmup_defaults() -> None:
    document = full_document()
    document["accounts"]["main"]["warmup"] = {"daily_caps": [10]}
    warmup = parse_accounts(document, Settings()).by_name["main"].warmup
    assert warmup == WarmupPlan((10,), 0.05, 0.10, 1)


def test_default_account_may_be_left_out_when_one_is_called_default() -> None:
    document = {"accounts": {"default": {"host": "a.example"}, "other": {"host": "b.example"}}}
    accounts = parse_accounts(document, Settings())
    assert accounts.default == "default"
    assert dict(accounts.routes) == {}


def test_secrets_are_read_lazily_from_environment_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_MAIN_SMTP_PASSWORD", raising=False)
    monkeypatch.delenv("TEST_MAIN_QUOTA_KEY", raising=False)
    password_file = tmp_path / "bulk-password"
    key_file = tmp_path / "bulk-key"
    document = full_document()
    document["accounts"]["bulk"]["password_file"] = str(password_file)
    document["accounts"]["bulk"]["quota"]["api_key_file"] = str(key_file)

    # neither file exists nor variable is set yet: parsing must not read them
    accounts = parse_accounts(document, Settings())
    main, bulk = accounts.by_name["main"], accounts.by_name["bulk"]
    assert main.quota is not None and bulk.quota is not None

    monkeypatch.setenv("TEST_MAIN_SMTP_PASSWORD", SECRET)
    monkeypatch.setenv("TEST_MAIN_QUOTA_KEY", QUOTA_SECRET)
    password_file.write_text("  bulk-pw\n", encoding="utf-8")
    key_file.write_text("bulk-key\n", encoding="utf-8")
    assert main.password() == SECRET
    assert main.quota.api_key() == QUOTA_SECRET
    assert bulk.password() == "bulk-pw"
    assert bulk.quota.api_key() == "bulk-key"

    # a rotated secret is seen on the next read
    monkeypatch.setenv("TEST_MAIN_SMTP_PASSWORD", "rotated")
    key_file.write_text("rotated-key", encoding="utf-8")
    assert main.password() == "rotated"
    assert bulk.quota.api_key() == "rotated-key"


def test_unset_password_env_reads_as_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_MAIN_SMTP_PASSWORD", raising=False)
    main = parse_accounts(full_document(), Settings()).by_name["main"]
    assert main.password() == ""


def test_unreadable_secret_file_raises_when_used_naming_the_account() -> None:
    bulk = parse_accounts(full_document(), Settings()).by_name["bulk"]
    with pytest.raises(AccountsError, match=r"account 'bulk' password: secret file cannot be read"):
        bulk.password()
    assert bulk.quota is not None
    with pytest.raises(AccountsError, match=r"account 'bulk' quota api key: secret file cannot be read"):
        bulk.quota.api_key()


def test_no_secret_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MAIN_SMTP_PASSWORD", SECRET)
    monkeypatch.setenv("TEST_MAIN_QUOTA_KEY", QUOTA_SECRET)
    accounts = parse_accounts(full_document(), Settings())
    main = accounts.by_name["main"]
    assert main.password() == SECRET and main.quota is not None and main.quota.api_key() == QUOTA_SECRET
    default = load_accounts(settings(smtp_password=SECRET, quota_url="https://q.example",
                                     quota_api_key=QUOTA_SECRET)).by_name[DEFAULT_ACCOUNT]
    assert default.password() == SECRET
    for shown in (repr(main), repr(main.quota), repr(accounts), repr(default), repr(default.quota),
                  str(main), str(default)):
        assert SECRET not in shown
        assert QUOTA_SECRET not in shown
    assert "smtp.main.example.com" in repr(main)  # the repr still says which account it is


def test_equality_ignores_the_secret_readers() -> None:
    a = parse_accounts(full_document(), Settings()).by_name["main"]
    b = parse_accounts(full_document(), Settings()).by_name["main"]
    assert a == b
    assert a.quota == b.quota


# --- errors -------------------------------------------------------------------------------


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = document
    for part in parents:
        node = node[part]
    node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("accounts.main.passwd", "x", r"account 'main': unknown field\(s\) passwd"),
        ("accounts.bulk.smtp_host", "x", r"account 'bulk': unknown field\(s\) smtp_host"),
        ("accounts.main.password", SECRET, r"account 'main': .*password"),
        ("accounts.main.tls", "ssl", r"account 'main': tls must be none, starttls or tls"),
        ("accounts.main.tls", True, r"account 'main': tls must be a str"),
        ("accounts.main.port", "587", r"account 'main': port must be a int"),
        ("accounts.main.host", 1, r"account 'main': host must be a str"),
        ("accounts.main.password_env", ["X"], r"account 'main': password_env must be a str"),
        ("accounts.bulk", "smtp.example.com", r"account 'bulk': expected an object"),
        ("routes.manager-3", "nowhere", r"route of manager 'manager-3' names unknown account 'nowhere'"),
        ("routes", ["main"], r'"routes" must map manager ids to account names'),
        ("routes.manager-3", 5, r'"routes" must map manager ids to account names'),
        ("default_account", "nowhere", r"default_account 'nowhere' is not configured"),
        ("accounts.main.domain_throttles.google", {"domains": "gmail.com", "per_hour": 5},
         r"account 'main': domain_throttles.google needs domains \(a list\) and per_hour \(>= 1\)"),
        ("accounts.main.domain_throttles.google", {"domains": [], "per_hour": 5},
         r"account 'main': domain_throttles.google needs domains"),
        ("accounts.main.domain_throttles.google", {"domains": ["gmail.com"], "per_hour": 0},
         r"account 'main': domain_throttles.google needs domains"),
        ("accounts.main.domain_throttles.google", {"domains": ["gmail.com"], "per_hour": "50"},
         r"account 'main': domain_throttles.google needs domains"),
        ("accounts.main.domain_throttles.google", {"domains": ["gmail.com"]},
         r"account 'main': domain_throttles.google needs domains"),
        ("accounts.main.domain_throttles.google", 50,
         r"account 'main': domain_throttles.google needs domains"),
        ("accounts.main.domain_throttles", [], r"account 'main': domain_throttles must be a dict"),
        ("accounts.main.warmup.daily_caps", [], r"account 'main': warmup.daily_caps must be a list of "
                                                r"positive integers"),
        ("accounts.main.warmup.daily_caps", [50, 0], r"account 'main': warmup.daily_caps"),
        ("accounts.main.warmup.daily_caps", [50, -100], r"account 'main': warmup.daily_caps"),
        ("accounts.main.warmup.daily_caps", [50, 1.5], r"account 'main': warmup.daily_caps"),
        ("accounts.main.warmup.daily_caps", "50,100", r"account 'main': warmup.daily_caps"),
        ("accounts.main.warmup", {}, r"account 'main': warmup.daily_caps"),
        ("accounts.main.warmup", [50], r"account 'main': warmup must be a dict"),
        ("accounts.main.hourly_rate", -1, r"account 'main': hourly_rate and daily_limit_per_manager "
                                          r"must be >= 0"),
        ("accounts.bulk.daily_limit_per_manager", -5, r"account 'bulk': hourly_rate and "
                                                      r"daily_limit_per_manager must be >= 0"),
        ("accounts.main.hourly_rate", 1.5, r"account 'main': hourly_rate must be a int"),
        ("accounts.main.quota", {"api_key_env": "K"}, r"account 'main': quota.url is required"),
        ("accounts.main.quota", {"url": ""}, r"account 'main': quota.url is required"),
        ("accounts.main.quota", "https://q.example", r"account 'main': quota must be a dict"),
        ("accounts.main.working_hours", {"hours": "20:00-08:00"}, r"account 'main': working_hours: "),
        ("accounts.main.working_hours", {"time_zone": "Nowhere/City"}, r"account 'main': working_hours: "),
        ("accounts.main.working_hours", {"start": "09:00"}, r"account 'main': working_hours: "),
        ("accounts.main.working_hours", "09:00-18:00", r"account 'main': working_hours must be a dict"),
    ],
)
def test_bad_document_names_account_and_field(path: str, value: Any, message: str) -> None:
    document = full_document()
    _set(document, path, value)
    with pytest.raises(AccountsError, match=message):
        parse_accounts(document, Settings())


@pytest.mark.parametrize(
    "document",
    [None, [], "accounts", {}, {"accounts": []}, {"accounts": "main"}, {"routes": {}}],
)
def test_document_without_accounts_object(document: Any) -> None:
    with pytest.raises(AccountsError, match=r'expected \{"accounts"'):
        parse_accounts(document, Settings())


def test_document_with_no_account() -> None:
    with pytest.raises(AccountsError, match="no account is configured"):
        parse_accounts({"accounts": {}}, Settings())


def test_default_is_required_without_an_account_called_default() -> None:
    document = full_document()
    del document["default_account"]
    with pytest.raises(AccountsError, match=r"default_account '' is not configured"):
        parse_accounts(document, Settings())


def test_plaintext_password_is_rejected_and_not_echoed() -> None:
    document = full_document()
    document["accounts"]["main"]["password"] = SECRET
    with pytest.raises(AccountsError) as info:
        parse_accounts(document, Settings())
    assert SECRET not in str(info.value)
    assert "'main'" in str(info.value)


def test_plaintext_password_gets_the_guidance_message() -> None:
    document = full_document()
    document["accounts"]["main"]["password"] = SECRET
    with pytest.raises(AccountsError, match="put the password in password_env or password_file"):
        parse_accounts(document, Settings())


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("accounts.main.domain_throttles.google.domains", ["gmail.com", 42], "domain_throttles.google"),
        ("accounts.main.quota.interval", "every minute", "quota.interval"),
        ("accounts.main.quota.interval", None, "quota.interval"),
        ("accounts.main.warmup.max_bounce_ratio", "low", "warmup.max_bounce_ratio"),
        ("accounts.main.warmup.min_daily_volume", [10], "warmup.min_daily_volume"),
    ],
)
def test_bad_values_are_accounts_errors(path: str, value: Any, field: str) -> None:
    document = full_document()
    _set(document, path, value)
    with pytest.raises(AccountsError, match=rf"account 'main': {field}"):
        parse_accounts(document, Settings())


# --- the accounts file --------------------------------------------------------------------


def test_load_accounts_from_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_bytes(orjson.dumps(full_document()))
    accounts = load_accounts(settings(accounts_file=str(path)))
    assert accounts == parse_accounts(full_document(), Settings())
    assert set(accounts.by_name) == {"main", "bulk"}


@pytest.mark.parametrize("content", [b"{", b"accounts: {}", b"", b"\xff\xfe{}"])
def test_load_accounts_invalid_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "accounts.json"
    path.write_bytes(content)
    with pytest.raises(AccountsError, match="MAILER_ACCOUNTS_FILE is not valid JSON"):
        load_accounts(settings(accounts_file=str(path)))


def test_load_accounts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AccountsError, match=r"MAILER_ACCOUNTS_FILE cannot be read \(No such file"):
        load_accounts(settings(accounts_file=str(tmp_path / "missing.json")))


def test_load_accounts_directory(tmp_path: Path) -> None:
    with pytest.raises(AccountsError, match=r"MAILER_ACCOUNTS_FILE cannot be read"):
        load_accounts(settings(accounts_file=str(tmp_path)))


def test_load_accounts_file_with_bad_document(tmp_path: Path) -> None:
    document = full_document()
    document["accounts"]["bulk"]["tls"] = "ssl"
    path = tmp_path / "accounts.json"
    path.write_bytes(orjson.dumps(document))
    with pytest.raises(AccountsError, match=r"account 'bulk': tls"):
        load_accounts(settings(accounts_file=str(path)))


# --- routing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account", "manager", "expected"),
    [
        ("bulk", "manager-2", "bulk"),  # the campaign's own account wins over the route
        ("main", "manager-1", "main"),
        ("bulk", "manager-9", "bulk"),
        (None, "manager-1", "bulk"),  # the manager's route
        (None, "manager-2", "main"),
        ("", "manager-1", "bulk"),  # an empty account name is no account
        (None, "manager-9", "main"),  # the default
        ("", "manager-9", "main"),
    ],
)
def test_route(account: str | None, manager: str, expected: str) -> None:
    accounts = parse_accounts(full_document(), Settings())
    assert accounts.route(account, manager) == expected


def test_route_without_file_is_default() -> None:
    accounts = load_accounts(Settings())
    assert accounts.route(None, "anyone") == DEFAULT_ACCOUNT


# --- domain throttles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "group"),
    [
        ("someone@gmail.com", "google"),
        ("someone@googlemail.com", "google"),  # one group for both Google domains
        ("Someone@GMAIL.COM", "google"),
        ("someone@GoogleMail.Com", "google"),
        ("someone@gmail.com.", "google"),  # trailing dot of a fully qualified name
        ("someone@gmail.com ", "google"),
        ("someone@ya.ru", "yandex"),
        ("odd@local@YANDEX.RU", "yandex"),  # the domain is after the last @
        ("someone@mail.gmail.com", None),  # a subdomain is another domain
        ("someone@gmail.co", None),
        ("someone@example.com", None),
    ],
)
def test_domain_throttle(email: str, group: str | None) -> None:
    main = parse_accounts(full_document(), Settings()).by_name["main"]
    throttle = main.domain_throttle(email)
    assert (throttle.group if throttle else None) == group
    if throttle is not None:
        assert throttle.per_hour == {"google": 50, "yandex": 80}[throttle.group]


def test_domain_throttle_of_account_without_throttles() -> None:
    account = Account("a", "h", 25, "none", "", lambda: "")
    assert account.domain_throttle("x@gmail.com") is None


def test_parse_does_not_mutate_the_document() -> None:
    document = full_document()
    before = copy.deepcopy(document)
    parse_accounts(document, Settings())
    assert document == before


def test_accounts_is_frozen() -> None:
    accounts = Accounts({})
    with pytest.raises(AttributeError):
        accounts.default = "x"  # type: ignore[misc]
    quota = QuotaSource("a", "u", lambda: "")
    with pytest.raises(AttributeError):
        quota.url = "v"  # type: ignore[misc]
