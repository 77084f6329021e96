"""SMTP accounts, their limits, and which account a campaign sends through (R12).

Contract: `load_accounts(settings)` returns `Accounts`: every configured
account with its connection, hourly rate, daily limit per manager, working
hours, provider quota source, destination-domain throttles and warm-up plan.
Without `MAILER_ACCOUNTS_FILE` there is one account, `default`, described by
the MAILER_SMTP_* and limit settings. `Accounts.route(account, manager_id)`
picks the account of a campaign: the one it names, else its manager's route,
else the default. Bad configuration raises `AccountsError` naming the
account and field; secrets are referenced (environment variable or file),
never stored in the file, and read only when used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.pipeline.json_file import read_json_file
from services.pipeline.settings import Settings
from services.pipeline.working_hours import WorkingHours, WorkingHoursError

DEFAULT_ACCOUNT = "default"


class AccountsError(ValueError):
    """The accounts configuration cannot be used."""


def secret_reader(what: str, env: str = "", path: str = "", value: str = "") -> Callable[[], str]:
    """A function reading a secret from a file (wins), an environment variable, or `value`."""

    def read() -> str:
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise AccountsError(f"{what}: secret file cannot be read ({exc.strerror})") from None
        if env:
            return os.environ.get(env, "")
        return value

    return read


@dataclass(frozen=True)
class QuotaSource:
    """Where the provider publishes an account's quota, and how often to ask."""

    account: str
    url: str
    api_key: Callable[[], str] = field(repr=False, compare=False)
    interval: float = 60.0


@dataclass(frozen=True)
class DomainThrottle:
    """An hourly throttle for the destination domains of one mailbox provider."""

    group: str
    domains: frozenset[str]
    per_hour: int


@dataclass(frozen=True)
class WarmupPlan:
    """Daily caps of a new sending domain; the next step only while bounces and deferrals are low."""

    daily_caps: tuple[int, ...]
    max_bounce_ratio: float = 0.05
    max_deferral_ratio: float = 0.10
    min_daily_volume: int = 1


@dataclass(frozen=True)
class Account:
    """One SMTP account and every limit that applies to its sends."""

    name: str
    host: str
    port: int
    tls: str
    username: str
    password: Callable[[], str] = field(repr=False, compare=False)
    hourly_rate: int = 100
    daily_limit_per_manager: int = 1000
    working_hours: WorkingHours = field(default_factory=lambda: WorkingHours.parse())
    quota: QuotaSource | None = None
    domain_throttles: tuple[DomainThrottle, ...] = ()
    warmup: WarmupPlan | None = None

    @property
    def time_zone(self) -> str:
        """The zone of the account's calendar day and working hours."""
        return self.working_hours.time_zone

    def domain_throttle(self, email: str) -> DomainThrottle | None:
        """The throttle whose provider hosts `email`'s domain, if any."""
        domain = email.rpartition("@")[2].strip().lower().rstrip(".")
        for throttle in self.domain_throttles:
            if domain in throttle.domains:
                return throttle
        return None


@dataclass(frozen=True)
class Accounts:
    """Every account, the manager routes and the default account's name."""

    by_name: Mapping[str, Account]
    routes: Mapping[str, str] = field(default_factory=dict)
    default: str = DEFAULT_ACCOUNT

    def get(self, name: str) -> Account | None:
        """The account called `name`, or None."""
        return self.by_name.get(name)

    def route(self, account: str | None, manager_id: str) -> str:
        """The account a campaign of `manager_id` sends through (named one, route, default)."""
        if account:
            return account
        return self.routes.get(manager_id, self.default)

    def command_problem(self, message: Mapping[str, Any]) -> str | None:
        """Why a valid start or test email cannot be sent as asked (None: it can).

        The account it routes to must be configured, and its own working hours
        must make sense; planner and reconciler both refuse such a command, so it
        never becomes a campaign that waits forever.
        """
        if message.get("kind") not in ("campaign.start", "campaign.test_email"):
            return None
        name = self.route(message.get("account"), message["manager_id"])
        account = self.by_name.get(name)
        if account is None:
            known = ", ".join(sorted(self.by_name))
            return f"{message['kind']} routes to SMTP account {name!r}, which is not configured ({known})"
        if message.get("working_hours"):
            try:
                WorkingHours.from_json(message["working_hours"], account.working_hours)
            except WorkingHoursError as exc:
                return f"{message['kind']}: working_hours: {exc}"
        return None


def load_accounts(settings: Settings) -> Accounts:
    """Accounts from MAILER_ACCOUNTS_FILE, or the single default account of the settings."""
    if not settings.accounts_file:
        return Accounts({DEFAULT_ACCOUNT: default_account(settings)})
    document = read_json_file(settings.accounts_file, "MAILER_ACCOUNTS_FILE", AccountsError)
    return parse_accounts(document, settings)


def default_account(settings: Settings) -> Account:
    """The `default` account described by the MAILER_SMTP_* and limit settings."""
    try:
        hours = WorkingHours.parse(settings.working_hours, settings.working_days, settings.time_zone)
    except WorkingHoursError as exc:
        raise AccountsError(f"MAILER_WORKING_HOURS/DAYS/TIME_ZONE: {exc}") from None
    quota = None
    if settings.quota_url:
        quota = QuotaSource(
            DEFAULT_ACCOUNT, settings.quota_url,
            secret_reader("MAILER_QUOTA_API_KEY", path=settings.quota_api_key_file,
                          value=settings.quota_api_key),
            settings.quota_sync_interval,
        )
    return Account(
        name=DEFAULT_ACCOUNT, host=settings.smtp_host, port=settings.smtp_port, tls=settings.smtp_tls,
        username=settings.smtp_username, password=settings.smtp_secret,
        hourly_rate=settings.hourly_rate, daily_limit_per_manager=settings.daily_limit_per_manager,
        working_hours=hours, quota=quota,
    )


def parse_accounts(document: Any, settings: Settings) -> Accounts:
    """Accounts from the JSON document of MAILER_ACCOUNTS_FILE."""
    if not isinstance(document, dict) or not isinstance(document.get("accounts"), dict):
        raise AccountsError('accounts file: expected {"accounts": {name: {...}}, ...}')
    if not document["accounts"]:
        raise AccountsError("accounts file: no account is configured")
    by_name = {name: _account(name, spec, settings) for name, spec in document["accounts"].items()}
    routes = document.get("routes", {})
    if not isinstance(routes, dict) or not all(isinstance(v, str) for v in routes.values()):
        raise AccountsError('accounts file: "routes" must map manager ids to account names')
    for manager, name in routes.items():
        if name not in by_name:
            raise AccountsError(f"accounts file: route of manager {manager!r} names unknown account {name!r}")
    default = document.get("default_account", DEFAULT_ACCOUNT if DEFAULT_ACCOUNT in by_name else "")
    if default not in by_name:
        raise AccountsError(f"accounts file: default_account {default!r} is not configured")
    return Accounts(by_name, routes, default)


def _account(name: str, spec: Any, settings: Settings) -> Account:
    where = f"accounts file: account {name!r}"
    if not isinstance(spec, dict):
        raise AccountsError(f"{where}: expected an object")
    if "password" in spec:
        raise AccountsError(f"{where}: put the password in password_env or password_file")
    known = {"host", "port", "tls", "username", "password_env", "password_file", "hourly_rate",
             "daily_limit_per_manager", "working_hours", "quota", "domain_throttles", "warmup"}
    if unknown := sorted(set(spec) - known):
        raise AccountsError(f"{where}: unknown field(s) {', '.join(unknown)}")

    tls = _get(spec, "tls", str, "none", where)
    if tls not in ("none", "starttls", "tls"):
        raise AccountsError(f"{where}: tls must be none, starttls or tls")
    try:
        default_hours = WorkingHours.parse(settings.working_hours, settings.working_days, settings.time_zone)
        hours = WorkingHours.from_json(_get(spec, "working_hours", dict, {}, where), default_hours)
    except WorkingHoursError as exc:
        raise AccountsError(f"{where}: working_hours: {exc}") from None
    quota = None
    if (q := _get(spec, "quota", dict, None, where)) is not None:
        if not isinstance(q.get("url"), str) or not q["url"]:
            raise AccountsError(f"{where}: quota.url is required")
        quota = QuotaSource(
            name, q["url"],
            secret_reader(f"{where} quota api key", env=str(q.get("api_key_env", "")),
                          path=str(q.get("api_key_file", ""))),
            _number(q, "interval", float, settings.quota_sync_interval, f"{where}: quota.interval"),
        )
    throttles = []
    for group, t in _get(spec, "domain_throttles", dict, {}, where).items():
        domains = t.get("domains") if isinstance(t, dict) else None
        per_hour = t.get("per_hour") if isinstance(t, dict) else None
        if (not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains)
                or not isinstance(per_hour, int) or per_hour < 1):
            raise AccountsError(
                f"{where}: domain_throttles.{group} needs domains (a list) and per_hour (>= 1)"
            )
        throttles.append(DomainThrottle(group, frozenset(d.lower() for d in domains), per_hour))
    warmup = None
    if (w := _get(spec, "warmup", dict, None, where)) is not None:
        caps = w.get("daily_caps")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, int) and c > 0 for c in caps):
            raise AccountsError(f"{where}: warmup.daily_caps must be a list of positive integers")
        warmup = WarmupPlan(
            tuple(caps),
            _number(w, "max_bounce_ratio", float, 0.05, f"{where}: warmup.max_bounce_ratio"),
            _number(w, "max_deferral_ratio", float, 0.10, f"{where}: warmup.max_deferral_ratio"),
            int(_number(w, "min_daily_volume", int, 1, f"{where}: warmup.min_daily_volume")),
        )
    hourly = _get(spec, "hourly_rate", int, settings.hourly_rate, where)
    daily = _get(spec, "daily_limit_per_manager", int, settings.daily_limit_per_manager, where)
    if hourly < 0 or daily < 0:
        raise AccountsError(f"{where}: hourly_rate and daily_limit_per_manager must be >= 0")
    return Account(
        name=name,
        host=_get(spec, "host", str, settings.smtp_host, where),
        port=_get(spec, "port", int, settings.smtp_port, where),
        tls=tls,
        username=_get(spec, "username", str, "", where),
        password=secret_reader(f"{where} password", env=_get(spec, "password_env", str, "", where),
                               path=_get(spec, "password_file", str, "", where)),
        hourly_rate=hourly, daily_limit_per_manager=daily, working_hours=hours, quota=quota,
        domain_throttles=tuple(throttles), warmup=warmup,
    )


def _number(spec: Mapping[str, Any], key: str, kind: type, default: float, what: str) -> float:
    """A non-negative number field (`kind` int or float); AccountsError naming `what` otherwise."""
    value = spec.get(key, default)
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or value < 0:
        raise AccountsError(f"{what} must be a non-negative {kind.__name__}")
    return float(value)


def _get(spec: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = spec.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise AccountsError(f"{where}: {key} must be a {kind.__name__}")
    return value
