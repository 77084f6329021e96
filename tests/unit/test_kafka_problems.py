"""librdkafka's errors, classified into one line naming the address and the setting to check.

The texts are what confluent-kafka 2.16 (librdkafka) reported against Apache Kafka 3.9.0
with a SASL_SSL (SCRAM-SHA-512) listener and a PLAINTEXT one, and against a closed port.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from services.pipeline.kafka_problems import (
    AUTHENTICATION,
    PROTOCOL,
    TLS,
    UNREACHABLE,
    UNRESOLVED,
    BrokerReporter,
    classify,
)
from services.pipeline.settings import Settings

SECURED = replace(Settings(), kafka_bootstrap_servers="localhost:9093", kafka_security_protocol="SASL_SSL",
                  kafka_sasl_username="mailer", kafka_sasl_password="pw-never-printed")
PLAIN = replace(Settings(), kafka_bootstrap_servers="127.0.0.1:9093")

CASES = [
    # (settings, error code, text, kind, address, what the line must name)
    (PLAIN, -195, "127.0.0.1:55027/bootstrap: Connect to ipv4#127.0.0.1:55027 failed: Connection refused "
     "(after 0ms in state CONNECT)", UNREACHABLE, "127.0.0.1:55027", "KAFKA_BOOTSTRAP_SERVERS"),
    (PLAIN, -193, "nosuchhost.invalid:9092/bootstrap: Failed to resolve 'nosuchhost.invalid:9092': Name or "
     "service not known (after 0ms in state CONNECT)", UNRESOLVED, "nosuchhost.invalid:9092",
     "KAFKA_BOOTSTRAP_SERVERS"),
    (SECURED, -169, "sasl_ssl://localhost:9093/bootstrap: SASL authentication error: Authentication failed "
     "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 308ms in "
     "state AUTH_REQ)", AUTHENTICATION, "localhost:9093", "MAILER_KAFKA_SASL_PASSWORD"),
    (SECURED, -169, "sasl_ssl://localhost:9093/bootstrap: SASL PLAIN mechanism handshake failed: Broker: "
     "Unsupported SASL mechanism: broker's supported mechanisms: SCRAM-SHA-512 (after 300ms in state "
     "AUTH_HANDSHAKE)", AUTHENTICATION, "localhost:9093", "MAILER_KAFKA_SASL_MECHANISM"),
    (SECURED, -181, "sasl_ssl://localhost:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
     "certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is "
     "correctly configured or root CA certificates are installed (install ca-certificates package) (after "
     "8ms in state SSL_HANDSHAKE)", TLS, "localhost:9093", "MAILER_KAFKA_SSL_CA_FILE"),
    (SECURED, None, "sasl_ssl://localhost:46853/bootstrap: Receive failed: ssl/tls alert bad certificate: "
     "SSL alert number 42 (after 9ms in state SSL_HANDSHAKE)", TLS, "localhost:46853",
     "MAILER_KAFKA_SSL_CERT_FILE"),
    (SECURED, -195, "sasl_ssl://127.0.0.1:39092/bootstrap: SSL handshake failed: Disconnected: SSL "
     "connection closed by peer: connecting to a PLAINTEXT broker listener? "
     "(after 0ms in state SSL_HANDSHAKE)",
     PROTOCOL, "127.0.0.1:39092", "MAILER_KAFKA_SECURITY_PROTOCOL"),
    (SECURED, -195, "sasl_ssl://localhost:9093/bootstrap: Disconnected: SSL connection closed by peer "
     "(after 0ms in state SSL_HANDSHAKE)", UNREACHABLE, "localhost:9093", "KAFKA_BOOTSTRAP_SERVERS"),
    (PLAIN, None, "127.0.0.1:39093/bootstrap: Disconnected: connection closed by peer: receive 0 after "
     "POLLIN (after 0ms in state APIVERSION_QUERY)", PROTOCOL, "127.0.0.1:39093",
     "MAILER_KAFKA_SECURITY_PROTOCOL"),
]


@pytest.mark.parametrize(("settings", "code", "text", "kind", "address", "names"), CASES)
def test_each_failure_is_one_line_naming_the_address_and_the_setting(
    settings: Settings, code: int | None, text: str, kind: str, address: str, names: str,
) -> None:
    problem = classify(text, code, settings)
    assert problem is not None
    assert (problem.kind, problem.address) == (kind, address)
    line = problem.line()
    assert "\n" not in line and address in line and names in line
    assert "after 0ms" not in line and "error:0A000086" not in line
    assert "pw-never-printed" not in line
    # waiting cannot cure a refused login, an unverified certificate or librdkafka's "PLAINTEXT
    # listener?"; a connection cut during the first request may be a broker stopping
    assert problem.fatal == (kind in (AUTHENTICATION, TLS) or "PLAINTEXT broker listener" in text)


def test_all_brokers_down_adds_nothing() -> None:
    assert classify("1/1 brokers are down", -187, PLAIN) is None


def test_a_repeated_problem_is_said_once_and_a_fatal_one_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    from confluent_kafka import KafkaError

    reporter = BrokerReporter(SECURED)
    auth = CASES[2][2]
    with caplog.at_level(logging.WARNING, logger="services.pipeline.kafka"):
        for _ in range(200):
            reporter.on_error(KafkaError(-169, auth))
            reporter.on_error(KafkaError(-187, "1/1 brokers are down"))
            reporter.note("sasl_ssl://localhost:9093/bootstrap: Disconnected (after 3ms in state UP)", -195)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2  # the refused login, the disconnect; each once
    assert reporter.fatal and reporter.problem is not None and reporter.problem.kind == AUTHENTICATION
    error = reporter.unavailable("not retried")
    assert str(error).startswith("Kafka at localhost:9093 refused the SASL login")
    assert "MAILER_KAFKA_SASL_PASSWORD" in str(error)


def test_a_quiet_reporter_records_without_logging(caplog: pytest.LogCaptureFixture) -> None:
    reporter = BrokerReporter(PLAIN, logger=None)
    with caplog.at_level(logging.DEBUG):
        reporter.note(CASES[0][2], -195)
        reporter.log(logging.WARNING, "%s [%s] %s", "CONFWARN", "rdkafka#producer-1", "some warning")
    assert caplog.records == []
    assert reporter.problem is not None and not reporter.fatal


def test_without_a_problem_the_error_still_names_the_address_and_settings() -> None:
    text = str(BrokerReporter(PLAIN).unavailable("no answer within 5 s"))
    assert "127.0.0.1:9093" in text and "KAFKA_BOOTSTRAP_SERVERS" in text and "MAILER_KAFKA_" in text


def test_other_librdkafka_warnings_pass_through_once(caplog: pytest.LogCaptureFixture) -> None:
    reporter = BrokerReporter(PLAIN)
    with caplog.at_level(logging.DEBUG, logger="services.pipeline.kafka"):
        for _ in range(5):
            reporter.log(logging.WARNING, "%s [%s] %s", "CONFWARN", "rdkafka#producer-1",
                         "[thrd:app]: Configuration property x is a consumer property")
        reporter.log(logging.INFO, "%s [%s] %s", "INIT", "rdkafka#producer-1", "starting")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CONFWARN" in warnings[0].getMessage()


def test_an_idle_connection_the_broker_closed_is_no_problem(caplog: pytest.LogCaptureFixture) -> None:
    reporter = BrokerReporter(PLAIN)
    with caplog.at_level(logging.DEBUG, logger="services.pipeline.kafka"):
        reporter.log(logging.INFO, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                     "127.0.0.1:9093/1: Disconnected (after 600012ms in state UP)")
    assert reporter.problem is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
