"""Every setting of the mailer, with its environment variable, default and meaning.

Contract: `Settings.from_env()` reads each field from the variable named in its
metadata (``MAILER_`` prefix unless the variable is a well-known one such as
``KAFKA_BOOTSTRAP_SERVERS``), falls back to the default, and raises
`SettingsError` naming the variable when a value cannot be parsed or values do
not fit together (a SASL protocol without user or password, a TLS file with
PLAINTEXT, a key without its certificate, a named file that does not exist,
min.insync.replicas above the replication factor). Secrets are never part of
`Settings.__repr__` nor of `describe()` output; a `*_FILE` secret wins over the
variable holding the secret itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A setting's environment variable holds a value that cannot be used."""


#: Security protocols and SASL mechanisms the pipeline's clients (librdkafka and aiokafka) share.
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: (session timeout, heartbeat interval) in seconds when the settings say 0, per broker kind:
#: Kafka's own defaults, and on tansu the short ones its slow group joins need (issue 13).
BROKER_DEFAULTS = {"kafka": (45.0, 3.0), "tansu": (6.0, 1.0)}


def setting(env: str, default: Any, doc: str, *, secret: bool = False) -> Any:
    """Declare one setting: its environment variable, default and meaning."""
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """The whole configuration of every service; one instance per process."""

    # --- infrastructure -------------------------------------------------------
    kafka_bootstrap_servers: str = setting(
        "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092",
        "Kafka bootstrap servers (host:port[,host:port]); Apache Kafka in production and the "
        "tests, the embedded tansu broker in the demo (MAILER_BROKER=tansu).",
    )
    database_url: str = setting(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/mailer",
        "PostgreSQL URL of the projections, claims and planner state.",
        secret=True,
    )
    redis_url: str = setting(
        "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis URL of the shared limiter.", secret=True
    )
    topic_prefix: str = setting(
        "MAILER_TOPIC_PREFIX", "",
        "Prefix put before every topic name (lets several pipelines share one cluster).",
    )
    app_id_prefix: str = setting(
        "MAILER_APP_ID_PREFIX", "mailer",
        "Prefix of every consumer group / faust app id (`<prefix>-planner`, ...).",
    )
    send_commands_partitions: int = setting(
        "MAILER_SEND_COMMANDS_PARTITIONS", 8,
        "Partitions of the send-commands topic: the upper bound of sender parallelism.",
    )
    topic_replication_factor: int = setting(
        "MAILER_TOPIC_REPLICATION_FACTOR", 1, "Replication factor of topics created at start-up."
    )
    topic_min_insync_replicas: int = setting(
        "MAILER_TOPIC_MIN_INSYNC_REPLICAS", 1,
        "`min.insync.replicas` of topics created at start-up: replicas that must have a message "
        "before an acks=all write succeeds (at most MAILER_TOPIC_REPLICATION_FACTOR).",
    )
    topics_mode: str = setting(
        "MAILER_TOPICS", "create",
        "`create`: services create missing topics at start-up; `check`: they create nothing and "
        "refuse to start unless every topic exists with its partitions (topics managed by a "
        "platform team: `mailer topics --print` lists them).",
    )
    broker_kind: str = setting(
        "MAILER_BROKER", "kafka",
        "`kafka` (Apache Kafka) or `tansu` (the demo's embedded broker): chooses the consumer-group "
        "timeouts' defaults and whether faust's producer is idempotent.",
    )
    # --- Kafka security ---------------------------------------------------------
    kafka_security_protocol: str = setting(
        "MAILER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
        "How every client talks to Kafka: `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.",
    )
    kafka_sasl_mechanism: str = setting(
        "MAILER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512",
        "SASL mechanism of the SASL_* protocols: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.",
    )
    kafka_sasl_username: str = setting(
        "MAILER_KAFKA_SASL_USERNAME", "", "SASL user name (required by the SASL_* protocols)."
    )
    kafka_sasl_password: str = setting(
        "MAILER_KAFKA_SASL_PASSWORD", "", "SASL password.", secret=True
    )
    kafka_sasl_password_file: str = setting(
        "MAILER_KAFKA_SASL_PASSWORD_FILE", "",
        "File holding the SASL password (a mounted secret); wins over MAILER_KAFKA_SASL_PASSWORD.",
    )
    kafka_ssl_ca_file: str = setting(
        "MAILER_KAFKA_SSL_CA_FILE", "",
        "PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); empty: the "
        "system's CAs.",
    )
    kafka_ssl_cert_file: str = setting(
        "MAILER_KAFKA_SSL_CERT_FILE", "", "PEM client certificate for mutual TLS (empty: none)."
    )
    kafka_ssl_key_file: str = setting(
        "MAILER_KAFKA_SSL_KEY_FILE", "",
        "PEM private key of MAILER_KAFKA_SSL_CERT_FILE (unencrypted; empty: in the certificate file).",
    )
    kafka_startup_timeout: float = setting(
        "MAILER_KAFKA_STARTUP_TIMEOUT", 60.0,
        "Seconds a service (and `mailer topics`) waits at start-up for Kafka to answer before it "
        "exits with status 1; a refused login or TLS handshake ends the wait at once.",
    )
    publish_timeout: float = setting(
        "MAILER_PUBLISH_TIMEOUT", 15.0,
        "Seconds `mailer publish` waits for Kafka to take its messages before it gives up with "
        "status 1 (`--timeout` overrides).",
    )
    # --- consumer behaviour ---------------------------------------------------
    broker_session_timeout: float = setting(
        "MAILER_BROKER_SESSION_TIMEOUT", 0.0,
        "Consumer-group session timeout in seconds; 0: the broker's default, 45 on Kafka (its "
        "own default), 6 on tansu (a join takes about half of it there).",
    )
    broker_heartbeat_interval: float = setting(
        "MAILER_BROKER_HEARTBEAT_INTERVAL", 0.0,
        "Consumer heartbeat interval in seconds; 0: 3 on Kafka, 1 on tansu.",
    )
    broker_commit_interval: float = setting(
        "MAILER_BROKER_COMMIT_INTERVAL", 1.0, "How often acknowledged offsets are committed (s)."
    )
    # --- planner --------------------------------------------------------------
    max_chunk_recipients: int = setting(
        "MAILER_MAX_CHUNK_RECIPIENTS", 1000, "Most recipients one recipient chunk may hold."
    )
    # --- guards at start (R13-R15) ---------------------------------------------
    max_campaign_recipients: int = setting(
        "MAILER_MAX_RECIPIENTS", 10_000,
        "Most recipients of one campaign, counted over every chunk; a larger start is refused.",
    )
    warn_campaign_recipients: int = setting(
        "MAILER_WARN_RECIPIENTS", 5_000, "Above this many recipients a start carries a warning.",
    )
    confirm_campaign_recipients: int = setting(
        "MAILER_CONFIRM_RECIPIENTS", 1_000,
        "Above this many recipients a start without `confirmed` waits as needs_confirmation "
        "for a campaign.confirm.",
    )
    starts_per_hour: int = setting(
        "MAILER_STARTS_PER_HOUR", 10, "Campaign starts per manager per sliding hour (0: no limit).",
    )
    test_emails_per_hour: int = setting(
        "MAILER_TEST_EMAILS_PER_HOUR", 5, "Test emails per manager per sliding hour (0: no limit).",
    )
    max_active_campaigns: int = setting(
        "MAILER_MAX_ACTIVE_CAMPAIGNS", 5,
        "Most campaigns of one manager sending, paused or awaiting confirmation at once.",
    )
    # --- sender ---------------------------------------------------------------
    sender_concurrency: int = setting(
        "MAILER_SENDER_CONCURRENCY", 16, "Send commands one sender process works on at once."
    )
    smtp_host: str = setting("MAILER_SMTP_HOST", "127.0.0.1", "SMTP server of the default account.")
    smtp_port: int = setting("MAILER_SMTP_PORT", 2525, "SMTP port of the default account.")
    smtp_tls: str = setting(
        "MAILER_SMTP_TLS", "none",
        "TLS mode of the default account: `none`, `starttls` or `tls` (implicit TLS).",
    )
    smtp_username: str = setting(
        "MAILER_SMTP_USERNAME", "", "SMTP user name of the default account (empty: no AUTH)."
    )
    smtp_password: str = setting(
        "MAILER_SMTP_PASSWORD", "", "SMTP password of the default account.", secret=True
    )
    smtp_password_file: str = setting(
        "MAILER_SMTP_PASSWORD_FILE", "",
        "File holding the SMTP password (a mounted secret); wins over MAILER_SMTP_PASSWORD.",
    )
    smtp_timeout: float = setting(
        "MAILER_SMTP_TIMEOUT", 30.0, "Seconds to wait for any SMTP reply."
    )
    smtp_pool_size: int = setting(
        "MAILER_SMTP_POOL_SIZE", 8, "Most open SMTP connections per account per sender process."
    )
    smtp_validate_certs: bool = setting(
        "MAILER_SMTP_VALIDATE_CERTS", True, "Verify the SMTP server's TLS certificate."
    )
    message_id_domain: str = setting(
        "MAILER_MESSAGE_ID_DOMAIN", "mailer.local",
        "Domain part of the deterministic Message-ID header (`<send_id@domain>`).",
    )
    # --- limits and deferrals ---------------------------------------------------
    redis_key_prefix: str = setting(
        "MAILER_REDIS_KEY_PREFIX", "mailer",
        "Prefix (Redis Cluster hash tag) of every limiter key; pipelines sharing a Redis differ here.",
    )
    accounts_file: str = setting(
        "MAILER_ACCOUNTS_FILE", "",
        "JSON file of SMTP accounts, routing, domain throttles and warm-up (docs/LIMITS.md); "
        "empty: one `default` account from MAILER_SMTP_* and the limits below.",
    )
    hourly_rate: int = setting(
        "MAILER_HOURLY_RATE", 100,
        "Sends per sliding 60 minutes of the default account (0: unlimited).",
    )
    daily_limit_per_manager: int = setting(
        "MAILER_DAILY_LIMIT_PER_MANAGER", 1000,
        "Sends per manager per calendar day in the account's time zone (0: unlimited).",
    )
    working_hours: str = setting(
        "MAILER_WORKING_HOURS", "09:00-18:00",
        "Default account's sending window, local time `HH:MM-HH:MM` (`00:00-24:00`: all day).",
    )
    working_days: str = setting(
        "MAILER_WORKING_DAYS", "1-5", "Default account's working days, ISO weekdays (`1-5`, `1,3,5`, `1-7`)."
    )
    time_zone: str = setting(
        "MAILER_TIME_ZONE", "Europe/Moscow",
        "Default account's time zone: working hours and the manager's calendar day.",
    )
    quota_url: str = setting(
        "MAILER_QUOTA_URL", "",
        "Provider quota endpoint of the default account (smtp.bz-style JSON); empty: no paid quota.",
    )
    quota_api_key: str = setting(
        "MAILER_QUOTA_API_KEY", "", "API key sent to the quota endpoint.", secret=True
    )
    quota_api_key_file: str = setting(
        "MAILER_QUOTA_API_KEY_FILE", "", "File holding the quota API key; wins over MAILER_QUOTA_API_KEY."
    )
    quota_sync_interval: float = setting(
        "MAILER_QUOTA_SYNC_INTERVAL", 60.0, "Seconds between two polls of each quota endpoint."
    )
    limiter_outage_policy: str = setting(
        "MAILER_LIMITER_OUTAGE_POLICY", "fail_closed",
        "When Redis is unreachable: `fail_closed` (send nothing, defer with limiter_unavailable) "
        "or `local_share` (each sender uses 1/MAILER_SENDER_INSTANCES of every limit in memory).",
    )
    sender_instances: int = setting(
        "MAILER_SENDER_INSTANCES", 1, "Sender processes sharing the limits (the N of `local_share`)."
    )
    limiter_retry_seconds: float = setting(
        "MAILER_LIMITER_RETRY_SECONDS", 5.0,
        "Clock seconds a send waits when the limiter is unavailable or the quota is unknown or 0.",
    )
    transient_retry_seconds: float = setting(
        "MAILER_TRANSIENT_RETRY_SECONDS", 60.0,
        "First backoff after a 4xx `slow down` reply (clock seconds; doubles per attempt, jittered).",
    )
    transient_max_attempts: int = setting(
        "MAILER_TRANSIENT_MAX_ATTEMPTS", 5, "SMTP attempts per recipient before a 4xx becomes final."
    )
    release_interval: float = setting(
        "MAILER_RELEASE_INTERVAL", 1.0,
        "Wall seconds between two passes of the reconciler's release of parked sends that are due.",
    )
    # --- delivery guarantees -------------------------------------------------
    claim_timeout: float = setting(
        "MAILER_CLAIM_TIMEOUT", 600.0,
        "Wall seconds after which a send claimed but never finished (its sender died mid-send) "
        "becomes `unknown`; it is never resent by itself. Keep it well above MAILER_SMTP_TIMEOUT.",
    )
    breaker_threshold: int = setting(
        "MAILER_BREAKER_THRESHOLD", 10,
        "Consecutive transient SMTP errors that say the server is in trouble (not replies about one "
        "mailbox) that open the circuit breaker of a campaign, or of an account (pausing its "
        "campaigns) with reason circuit_open.",
    )
    breaker_cooldown: float = setting(
        "MAILER_BREAKER_COOLDOWN", 300.0,
        "Seconds an open account circuit breaker waits before its half-open probe (one send; "
        "delivered: the breaker closes; another server error: it reopens for twice as long, up "
        "to 1 h or this value if longer).",
    )
    transient_max_age: float = setting(
        "MAILER_TRANSIENT_MAX_AGE", 86400.0,
        "Clock seconds after its first attempt that a send keeps being retried after 4xx replies.",
    )
    reply_rules_file: str = setting(
        "MAILER_REPLY_RULES_FILE", "",
        "JSON file of SMTP reply rules put before the defaults (services/sender/smtp_replies.py).",
    )
    clock_file: str = setting(
        "MAILER_CLOCK_FILE", "",
        "Tests only: a JSON file {start, anchor, speed} driving a compressed clock every process "
        "shares (services/pipeline/clock.py); empty: the wall clock.",
    )
    # --- reconciler -----------------------------------------------------------
    reconciler_batch_size: int = setting(
        "MAILER_RECONCILER_BATCH_SIZE", 500, "Most messages the reconciler writes in one transaction."
    )
    reconciler_batch_seconds: float = setting(
        "MAILER_RECONCILER_BATCH_SECONDS", 0.5, "Longest wait to fill a reconciler batch (s)."
    )
    http_host: str = setting("MAILER_HTTP_HOST", "0.0.0.0", "Interface of the poll endpoint.")
    http_port: int = setting(
        "MAILER_HTTP_PORT", 8080, "Port of the reconciler's poll endpoint (`GET /campaigns/{id}`)."
    )
    failed_recipients_limit: int = setting(
        "MAILER_FAILED_RECIPIENTS_LIMIT", 100,
        "Most failed recipients listed by the poll endpoint (the count is always exact).",
    )
    api_tokens_file: str = setting(
        "MAILER_API_TOKENS_FILE", "",
        "JSON file of the HTTP API's bearer tokens, stored as SHA-256 hashes, each mapped to an "
        "actor and a role (`manager`: own campaigns only, `ops`, `admin`); `mailer api-token` "
        "makes one. Empty: every API request is refused with 401 (`/healthz` stays open).",
    )
    # --- operations -----------------------------------------------------------
    metrics_port: int = setting(
        "MAILER_METRICS_PORT", 0,
        "Port of this process's Prometheus `/metrics` (0: not served). `mailer <service> "
        "--metrics-port N` sets it per process.",
    )
    metrics_host: str = setting("MAILER_METRICS_HOST", "0.0.0.0", "Interface of `/metrics`.")
    # --- logging --------------------------------------------------------------
    log_level: str = setting("MAILER_LOG_LEVEL", "info", "Log level: debug, info, warn, error.")
    log_addresses: bool = setting(
        "MAILER_LOG_ADDRESSES", False,
        "Write recipient addresses in full in the logs (default: masked, `i***@example.com`).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default `os.environ`), validating every value."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = f.metadata["env"]
            if var in env:
                values[f.name] = _parse(var, env[var], type(f.default))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise `SettingsError` for values that parse but make no sense."""
        if self.smtp_tls not in ("none", "starttls", "tls"):
            raise SettingsError(
                f"MAILER_SMTP_TLS must be none, starttls or tls, not {self.smtp_tls!r}"
            )
        if self.limiter_outage_policy not in ("fail_closed", "local_share"):
            raise SettingsError(
                "MAILER_LIMITER_OUTAGE_POLICY must be fail_closed or local_share, "
                f"not {self.limiter_outage_policy!r}"
            )
        for name in ("send_commands_partitions", "sender_concurrency", "smtp_pool_size",
                     "max_chunk_recipients", "max_campaign_recipients", "max_active_campaigns",
                     "reconciler_batch_size", "sender_instances",
                     "transient_max_attempts", "breaker_threshold"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_var(name)} must be at least 1")
        if self.breaker_cooldown < 0:
            raise SettingsError("MAILER_BREAKER_COOLDOWN must not be negative")
        self._check_kafka()

    def _check_kafka(self) -> None:
        """The broker kind, topic and Kafka security settings (see the module docstring)."""
        if self.broker_kind not in BROKER_DEFAULTS:
            raise SettingsError(f"MAILER_BROKER must be kafka or tansu, not {self.broker_kind!r}")
        if self.topics_mode not in ("create", "check"):
            raise SettingsError(f"MAILER_TOPICS must be create or check, not {self.topics_mode!r}")
        for name in ("topic_replication_factor", "topic_min_insync_replicas"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_var(name)} must be at least 1")
        if self.topic_min_insync_replicas > self.topic_replication_factor:
            raise SettingsError(
                f"MAILER_TOPIC_MIN_INSYNC_REPLICAS={self.topic_min_insync_replicas} is more than "
                f"MAILER_TOPIC_REPLICATION_FACTOR={self.topic_replication_factor}: no write could succeed"
            )
        for name in ("broker_session_timeout", "broker_heartbeat_interval", "kafka_startup_timeout",
                     "publish_timeout"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{env_var(name)} must not be negative")
        if self.heartbeat_interval() >= self.session_timeout():
            raise SettingsError(
                f"MAILER_BROKER_HEARTBEAT_INTERVAL ({self.heartbeat_interval():g} s) must be less than "
                f"MAILER_BROKER_SESSION_TIMEOUT ({self.session_timeout():g} s)"
            )
        protocol = self.kafka_security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                f"MAILER_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"not {protocol!r}"
            )
        if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
            raise SettingsError(
                f"MAILER_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                f"not {self.kafka_sasl_mechanism!r}"
            )
        sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
        if sasl:
            if not self.kafka_sasl_username:
                raise SettingsError(f"MAILER_KAFKA_SASL_USERNAME is required with {protocol}")
            if not (self.kafka_sasl_password or self.kafka_sasl_password_file):
                raise SettingsError(
                    f"MAILER_KAFKA_SASL_PASSWORD (or MAILER_KAFKA_SASL_PASSWORD_FILE) is required with "
                    f"{protocol}"
                )
        else:
            for name in ("kafka_sasl_username", "kafka_sasl_password", "kafka_sasl_password_file"):
                if getattr(self, name):
                    raise SettingsError(
                        f"{env_var(name)} is set but MAILER_KAFKA_SECURITY_PROTOCOL={protocol} "
                        "uses no SASL (SASL_PLAINTEXT or SASL_SSL does)"
                    )
        if not tls:
            for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
                if getattr(self, name):
                    raise SettingsError(
                        f"{env_var(name)} is set but MAILER_KAFKA_SECURITY_PROTOCOL={protocol} "
                        "uses no TLS (SSL or SASL_SSL does)"
                    )
        if self.kafka_ssl_key_file and not self.kafka_ssl_cert_file:
            raise SettingsError("MAILER_KAFKA_SSL_KEY_FILE is set without MAILER_KAFKA_SSL_CERT_FILE")
        for name in ("kafka_sasl_password_file", "kafka_ssl_ca_file", "kafka_ssl_cert_file",
                     "kafka_ssl_key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise SettingsError(f"{env_var(name)}={path!r}: no such file")
        if sasl:
            self.kafka_sasl_secret()  # a password file that cannot be read, or is empty, stops here

    def session_timeout(self) -> float:
        """The consumer-group session timeout (s): the setting, or the broker kind's default."""
        return self.broker_session_timeout or BROKER_DEFAULTS[self.broker_kind][0]

    def heartbeat_interval(self) -> float:
        """The consumer heartbeat interval (s): the setting, or the broker kind's default."""
        return self.broker_heartbeat_interval or BROKER_DEFAULTS[self.broker_kind][1]

    def kafka_sasl_secret(self) -> str:
        """The SASL password, read from the secret file when one is set."""
        if not self.kafka_sasl_password_file:
            return self.kafka_sasl_password
        try:
            with open(self.kafka_sasl_password_file, encoding="utf-8") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            raise SettingsError(
                f"MAILER_KAFKA_SASL_PASSWORD_FILE cannot be read ({exc.strerror})"
            ) from None
        if not secret:
            raise SettingsError("MAILER_KAFKA_SASL_PASSWORD_FILE is empty")
        return secret

    def smtp_secret(self) -> str:
        """The default account's SMTP password, read from the secret file when one is set."""
        if self.smtp_password_file:
            try:
                with open(self.smtp_password_file, encoding="utf-8") as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise SettingsError(
                    f"MAILER_SMTP_PASSWORD_FILE cannot be read ({exc.strerror})"
                ) from None
        return self.smtp_password

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables (for child processes)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            env[f.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def app_id(self, service: str) -> str:
        """Faust app id, and so consumer group, of `service`."""
        return f"{self.app_id_prefix}-{service}"


def env_var(field_name: str) -> str:
    """The environment variable of one settings field."""
    for f in dataclasses.fields(Settings):
        if f.name == field_name:
            return str(f.metadata["env"])
    raise KeyError(field_name)


def describe() -> Iterator[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting; secrets' defaults are shown."""
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        yield f.metadata["env"], shown, f.metadata["doc"]


def markdown_table() -> str:
    """The settings table the README shows."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for var, default, doc in describe():
        rows.append(f"| `{var}` | `{default}` | {doc} |")
    return "\n".join(rows)


def _parse(var: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
