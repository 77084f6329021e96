"""What went wrong between a client and Kafka, said once, with the setting to check.

Contract: a `BrokerReporter` is the `error_cb` and the `logger` of a
confluent-kafka client (services/pipeline/kafka_clients.py). librdkafka
repeats a connection failure every few milliseconds, as an error and as a log
line; the reporter turns each distinct problem (kind and address) into ONE
warning of ours, repeated at most every `repeat_after` seconds while it lasts,
naming the address that failed, librdkafka's reason and what to check:
KAFKA_BOOTSTRAP_SERVERS when nothing answers, MAILER_KAFKA_SASL_PASSWORD (or its
file) when the login is refused, MAILER_KAFKA_SSL_CA_FILE when the broker's
certificate cannot be verified, MAILER_KAFKA_SECURITY_PROTOCOL when the listener
speaks another protocol. `problem` is the latest problem, for a caller that
gives up (`BrokerUnavailable` carries its line); `fatal` says whether it is one
waiting cannot cure (a refused login, a TLS or protocol mismatch). Other
librdkafka log lines at warning or above pass through once per window; none of
them, nor any line of ours, holds a password.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

    from services.pipeline.settings import Settings

log = logging.getLogger("services.pipeline.kafka")

#: librdkafka error codes (confluent_kafka.KafkaError) the reporter classifies.
_AUTHENTICATION, _SSL, _ALL_BROKERS_DOWN = -169, -181, -187
#: "sasl_ssl://127.0.0.1:9093/bootstrap: ..." or "broker-1:9092/1: ...": the broker a line is about.
_BROKER = re.compile(r"^(?:[a-z_]+://)?(?P<address>[^\s/]+)/(?:bootstrap|-?\d+):\s*")
_AFTER = re.compile(r"\s*\(after \d+ms in state [A-Z_]+\)\s*$")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")

#: Kinds of problem.
UNREACHABLE, UNRESOLVED, AUTHENTICATION, TLS, PROTOCOL, OTHER = (
    "unreachable", "unresolved", "authentication", "tls", "protocol", "other")


class BrokerUnavailable(RuntimeError):
    """Kafka cannot be used; the message is one line naming the address and what to check."""


@dataclass(frozen=True)
class BrokerProblem:
    """One classified problem: its kind, the broker address, librdkafka's reason, what to check."""

    kind: str
    address: str
    reason: str
    check: str
    #: Whether waiting cannot cure it (a configuration that does not fit the broker).
    fatal: bool = False

    def line(self) -> str:
        """The problem as one line."""
        what = {
            UNREACHABLE: f"cannot connect to Kafka at {self.address}",
            UNRESOLVED: f"cannot resolve the Kafka address {self.address}",
            AUTHENTICATION: f"Kafka at {self.address} refused the SASL login",
            TLS: f"TLS handshake with Kafka at {self.address} failed",
            PROTOCOL: f"Kafka at {self.address} speaks another security protocol",
            OTHER: f"Kafka at {self.address}",
        }[self.kind]
        return f"{what} ({self.reason}): check {self.check}"


def classify(text: str, code: int | None, settings: Settings) -> BrokerProblem | None:
    """The problem a librdkafka error or FAIL log line describes; None for noise
    (`_ALL_BROKERS_DOWN` repeats what the per-broker lines said)."""
    if code == _ALL_BROKERS_DOWN:
        return None
    match = _BROKER.match(text)
    address = match.group("address") if match else settings.kafka_bootstrap_servers
    reason = _AFTER.sub("", text[match.end():] if match else text).strip() or text
    protocol = settings.kafka_security_protocol
    lowered = reason.lower()
    if code == _AUTHENTICATION or "sasl" in lowered or "authentication" in lowered:
        if "mechanism" in lowered and ("unsupported" in lowered or "handshake failed" in lowered):
            check = f"MAILER_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism}"
        else:
            secret = ("MAILER_KAFKA_SASL_PASSWORD_FILE" if settings.kafka_sasl_password_file
                      else "MAILER_KAFKA_SASL_PASSWORD")
            check = (f"{secret} and MAILER_KAFKA_SASL_USERNAME={settings.kafka_sasl_username!r} "
                     f"({settings.kafka_sasl_mechanism})")
        return BrokerProblem(AUTHENTICATION, address, _short(reason), check, fatal=True)
    tls_listener = not protocol.endswith("SSL") and "disconnected" in lowered and "apiversion" in text.lower()
    if "plaintext broker listener" in lowered or tls_listener:
        # librdkafka's own hint is certain; a PLAINTEXT client cut off before the broker
        # answered its first request is most likely at a TLS listener, or at a broker stopping
        return BrokerProblem(
            PROTOCOL, address, _short(reason),
            f"MAILER_KAFKA_SECURITY_PROTOCOL={protocol} against the listener's protocol "
            "(and KAFKA_BOOTSTRAP_SERVERS names the right port)", fatal=not tls_listener,
        )
    if code == _SSL or any(word in lowered for word in ("handshake failed", "certificate", "ssl alert",
                                                        "tls alert")):
        if "certificate verify failed" in lowered or "could not be verified" in lowered:
            check = ("MAILER_KAFKA_SSL_CA_FILE (the CA that signed the broker's certificate; "
                     "the name in KAFKA_BOOTSTRAP_SERVERS must be in that certificate)")
        elif "alert" in lowered and any(word in lowered for word in (
                "bad certificate", "certificate required", "unknown ca", "certificate unknown")):
            check = ("MAILER_KAFKA_SSL_CERT_FILE and MAILER_KAFKA_SSL_KEY_FILE (the broker wants a client "
                     "certificate signed by a CA it trusts)")
        else:
            check = ("MAILER_KAFKA_SSL_CA_FILE, MAILER_KAFKA_SSL_CERT_FILE and MAILER_KAFKA_SSL_KEY_FILE "
                     f"(MAILER_KAFKA_SECURITY_PROTOCOL={protocol})")
        return BrokerProblem(TLS, address, _short(reason), check, fatal=True)
    if "resolve" in lowered:
        return BrokerProblem(UNRESOLVED, address, _short(reason), "KAFKA_BOOTSTRAP_SERVERS")
    if any(word in lowered for word in ("connect", "refused", "timed out", "unreachable",
                                         "disconnected", "transport")):
        return BrokerProblem(
            UNREACHABLE, address, _short(reason),
            f"KAFKA_BOOTSTRAP_SERVERS and that the broker runs there "
            f"(MAILER_KAFKA_SECURITY_PROTOCOL={protocol})",
        )
    return BrokerProblem(OTHER, address, _short(reason), "the broker's log")


def _short(reason: str) -> str:
    """librdkafka's reason without its OpenSSL error numbers and install hints."""
    reason = re.sub(r"error:[0-9A-F]{8}:SSL routines::", "", reason)
    reason = reason.split(": broker certificate could not be verified")[0]
    return reason[:200]


class BrokerReporter:
    """The `error_cb` and `logger` of confluent-kafka clients (see the module docstring).

    `logger=None` records problems without logging them: a command that prints one line
    of its own when it gives up.
    """

    def __init__(self, settings: Settings, *, logger: logging.Logger | None = log,
                 repeat_after: float = 300.0) -> None:
        self._settings = settings
        self._logger = logger
        self._repeat_after = repeat_after
        self._said: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.problem: BrokerProblem | None = None

    @property
    def fatal(self) -> bool:
        """Whether the latest problem is one waiting cannot cure."""
        problem = self.problem
        return problem is not None and problem.fatal

    def on_error(self, error: KafkaError) -> None:
        """librdkafka's `error_cb`."""
        self.note(str(error.str()), int(error.code()))

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """librdkafka's log lines (`logger`): `fmt % (facility, client name, text)`."""
        facility, text = (str(args[0]), str(args[2])) if len(args) == 3 else ("", fmt % args)
        text = _THREAD.sub("", text)
        if facility == "FAIL" and (level >= logging.WARNING or "APIVERSION_QUERY" in text):
            # a connection's failure (also an error_cb, mostly); below warning it is an idle
            # connection the broker closed, or, cut before the first answer, a TLS listener
            self.note(text, None)
        elif facility == "FAIL" and self._logger is not None:
            self._logger.debug("librdkafka %s: %s", facility, text)
        elif level >= logging.WARNING:
            self._say(("librdkafka", f"{facility} {text}"), level, f"Kafka client: {facility}: {text}",
                      "kafka_client")
        elif self._logger is not None:
            self._logger.debug("librdkafka %s: %s", facility, text)

    def note(self, text: str, code: int | None) -> None:
        """Classify one librdkafka error; say it unless it was said within `repeat_after` s."""
        problem = classify(text, code, self._settings)
        if problem is None:
            return
        with self._lock:
            # a fatal problem is not replaced by the disconnect that follows it
            if self.problem is None or not self.problem.fatal or problem.fatal:
                self.problem = problem
        self._say((problem.kind, problem.address), logging.WARNING, problem.line(), "kafka_unavailable")

    def _say(self, key: tuple[str, str], level: int, line: str, event: str) -> None:
        now = time.monotonic()
        with self._lock:
            said = self._said.get(key)
            if said is not None and now - said < self._repeat_after:
                return
            self._said[key] = now
        if self._logger is not None:
            self._logger.log(level, line, extra={"event": event})

    def unavailable(self, what: str) -> BrokerUnavailable:
        """The error of a caller giving up on `what` (e.g. "no answer within 15 s")."""
        problem = self.problem
        if problem is None:
            return BrokerUnavailable(
                f"Kafka at {self._settings.kafka_bootstrap_servers}: {what}; check "
                "KAFKA_BOOTSTRAP_SERVERS and the MAILER_KAFKA_* security settings"
            )
        return BrokerUnavailable(f"{problem.line()}; {what}")
