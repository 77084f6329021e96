"""Kafka client settings: the librdkafka config, faust's credentials, and what is refused."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from services.pipeline.kafka_clients import client_config, faust_credentials, security_config
from services.pipeline.settings import (
    SASL_MECHANISMS,
    Settings,
    SettingsError,
    describe,
    markdown_table,
)
from tests.support.certificates import Certificates, make_certificates, openssl_missing

PASSWORD = "pw-Zq81-never-printed"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if reason := openssl_missing():
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("certs"))


def env_for(protocol: str, mechanism: str, certs: Certificates, *, mutual: bool = False) -> dict[str, str]:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "broker-1:9093,broker-2:9093",
           "MAILER_KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol.startswith("SASL_"):
        env.update({"MAILER_KAFKA_SASL_MECHANISM": mechanism, "MAILER_KAFKA_SASL_USERNAME": "mailer",
                    "MAILER_KAFKA_SASL_PASSWORD": PASSWORD})
    if protocol.endswith("SSL"):
        env["MAILER_KAFKA_SSL_CA_FILE"] = str(certs.ca)
        if mutual:
            env["MAILER_KAFKA_SSL_CERT_FILE"] = str(certs.client_cert)
            env["MAILER_KAFKA_SSL_KEY_FILE"] = str(certs.client_key)
    return env


COMBINATIONS = [("PLAINTEXT", "-", False), ("SSL", "-", False), ("SSL", "-", True),
                *[(p, m, mutual) for p in ("SASL_PLAINTEXT", "SASL_SSL") for m in SASL_MECHANISMS
                  for mutual in ((False, True) if p == "SASL_SSL" else (False,))]]


@pytest.mark.parametrize(("protocol", "mechanism", "mutual"), COMBINATIONS)
def test_every_protocol_and_mechanism_gives_librdkafka_and_faust_the_same_security(
    protocol: str, mechanism: str, mutual: bool, certs: Certificates,
) -> None:
    settings = Settings.from_env(env_for(protocol, mechanism, certs, mutual=mutual))
    config = security_config(settings)
    expected = {"bootstrap.servers": "broker-1:9093,broker-2:9093", "security.protocol": protocol}
    if protocol.startswith("SASL_"):
        expected |= {"sasl.mechanisms": mechanism, "sasl.username": "mailer", "sasl.password": PASSWORD}
    if protocol.endswith("SSL"):
        expected["ssl.ca.location"] = str(certs.ca)
        if mutual:
            expected |= {"ssl.certificate.location": str(certs.client_cert),
                         "ssl.key.location": str(certs.client_key)}
    assert config == expected

    credentials = faust_credentials(settings)
    aiokafka = dict(credentials_to_aiokafka_auth(credentials))
    assert aiokafka["security_protocol"] == protocol
    if protocol == "PLAINTEXT":
        assert credentials is None
        return
    if protocol == "SSL":
        assert isinstance(credentials, SSLCredentials)
    else:
        assert isinstance(credentials, SASLCredentials)
        assert aiokafka["sasl_mechanism"] == mechanism
        assert (aiokafka["sasl_plain_username"], aiokafka["sasl_plain_password"]) == ("mailer", PASSWORD)
        assert PASSWORD not in repr(credentials)
    context = aiokafka["ssl_context"]
    if protocol.endswith("SSL"):
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert any(c["subject"] == ((("commonName", "ca"),),) for c in context.get_ca_certs())
    else:
        assert context is None


def test_client_config_reports_errors_and_logs_through_one_reporter() -> None:
    config = client_config(Settings(), client_id="mailer-x")
    assert config["client.id"] == "mailer-x" and config["security.protocol"] == "PLAINTEXT"
    reporter = config["logger"]
    assert config["error_cb"] == reporter.on_error
    assert callable(reporter.log)


def test_a_certificate_holding_its_key_serves_as_both(certs: Certificates, tmp_path: Path) -> None:
    both = tmp_path / "client-both.pem"
    both.write_text(certs.client_cert.read_text() + certs.client_key.read_text())
    env = env_for("SSL", "-", certs) | {"MAILER_KAFKA_SSL_CERT_FILE": str(both)}
    settings = Settings.from_env(env)
    config = security_config(settings)
    assert config["ssl.certificate.location"] == config["ssl.key.location"] == str(both)
    assert isinstance(faust_credentials(settings), SSLCredentials)


def test_the_password_file_wins_over_the_password(certs: Certificates, tmp_path: Path) -> None:
    secret = tmp_path / "kafka_password"
    secret.write_text("from-the-file\n")
    env = env_for("SASL_SSL", "SCRAM-SHA-256", certs) | {"MAILER_KAFKA_SASL_PASSWORD_FILE": str(secret)}
    settings = Settings.from_env(env)
    assert security_config(settings)["sasl.password"] == "from-the-file"
    credentials = faust_credentials(settings)
    assert isinstance(credentials, SASLCredentials) and credentials.password == "from-the-file"
    # the file alone is enough
    env.pop("MAILER_KAFKA_SASL_PASSWORD")
    assert Settings.from_env(env).kafka_sasl_secret() == "from-the-file"


BAD = [
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "MAILER_KAFKA_SECURITY_PROTOCOL"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "sasl_ssl"}, "MAILER_KAFKA_SECURITY_PROTOCOL"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "MAILER_KAFKA_SASL_MECHANISM": "GSSAPI",
      "MAILER_KAFKA_SASL_USERNAME": "u", "MAILER_KAFKA_SASL_PASSWORD": "p"}, "MAILER_KAFKA_SASL_MECHANISM"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "MAILER_KAFKA_SASL_PASSWORD": "p"},
     "MAILER_KAFKA_SASL_USERNAME"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MAILER_KAFKA_SASL_USERNAME": "u"},
     "MAILER_KAFKA_SASL_PASSWORD"),
    ({"MAILER_KAFKA_SASL_USERNAME": "u", "MAILER_KAFKA_SASL_PASSWORD": "p"}, "MAILER_KAFKA_SASL_USERNAME"),
    ({"MAILER_KAFKA_SSL_CA_FILE": "{ca}"}, "MAILER_KAFKA_SSL_CA_FILE"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SSL", "MAILER_KAFKA_SSL_KEY_FILE": "{key}"},
     "MAILER_KAFKA_SSL_KEY_FILE"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SSL", "MAILER_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"},
     "MAILER_KAFKA_SSL_CA_FILE"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SSL", "MAILER_KAFKA_SSL_CERT_FILE": "/nonexistent/c.pem"},
     "MAILER_KAFKA_SSL_CERT_FILE"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MAILER_KAFKA_SASL_USERNAME": "u",
      "MAILER_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"}, "MAILER_KAFKA_SASL_PASSWORD_FILE"),
    ({"MAILER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MAILER_KAFKA_SASL_USERNAME": "u",
      "MAILER_KAFKA_SASL_PASSWORD_FILE": "{empty}"}, "MAILER_KAFKA_SASL_PASSWORD_FILE"),
    ({"MAILER_BROKER": "redpanda"}, "MAILER_BROKER"),
    ({"MAILER_TOPICS": "ensure"}, "MAILER_TOPICS"),
    ({"MAILER_TOPIC_MIN_INSYNC_REPLICAS": "2"}, "MAILER_TOPIC_MIN_INSYNC_REPLICAS"),
    ({"MAILER_TOPIC_REPLICATION_FACTOR": "3", "MAILER_TOPIC_MIN_INSYNC_REPLICAS": "0"},
     "MAILER_TOPIC_MIN_INSYNC_REPLICAS"),
    ({"MAILER_BROKER_SESSION_TIMEOUT": "2"}, "MAILER_BROKER_HEARTBEAT_INTERVAL"),
    ({"MAILER_PUBLISH_TIMEOUT": "-1"}, "MAILER_PUBLISH_TIMEOUT"),
]


@pytest.mark.parametrize(("env", "variable"), BAD)
def test_settings_that_do_not_fit_together_are_refused_naming_the_variable(
    env: dict[str, str], variable: str, certs: Certificates, tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    filled = {k: v.format(ca=certs.ca, key=certs.client_key, empty=empty) for k, v in env.items()}
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(filled)
    assert variable in str(refused.value)
    assert "p\n" not in str(refused.value) and PASSWORD not in str(refused.value)


def test_replication_settings_that_fit_are_accepted() -> None:
    settings = Settings.from_env({"MAILER_TOPIC_REPLICATION_FACTOR": "3",
                                  "MAILER_TOPIC_MIN_INSYNC_REPLICAS": "2"})
    assert (settings.topic_replication_factor, settings.topic_min_insync_replicas) == (3, 2)


@pytest.mark.parametrize(("broker", "session", "heartbeat"), [("kafka", 45.0, 3.0), ("tansu", 6.0, 1.0)])
def test_consumer_timeouts_default_per_broker_and_a_set_value_wins(
    broker: str, session: float, heartbeat: float,
) -> None:
    settings = Settings.from_env({"MAILER_BROKER": broker})
    assert (settings.session_timeout(), settings.heartbeat_interval()) == (session, heartbeat)
    chosen = Settings.from_env({"MAILER_BROKER": broker, "MAILER_BROKER_SESSION_TIMEOUT": "10",
                                "MAILER_BROKER_HEARTBEAT_INTERVAL": "2.5"})
    assert (chosen.session_timeout(), chosen.heartbeat_interval()) == (10.0, 2.5)


def test_no_kafka_secret_in_repr_describe_or_the_readme_table(certs: Certificates) -> None:
    settings = Settings.from_env(env_for("SASL_SSL", "SCRAM-SHA-512", certs))
    assert settings.kafka_sasl_password == PASSWORD
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(list(describe())) and PASSWORD not in markdown_table()
    secret_fields = [f.name for f in dataclasses.fields(Settings) if f.metadata["secret"]]
    assert "kafka_sasl_password" in secret_fields


def test_faust_app_gets_the_credentials_timeouts_and_idempotent_producer_on_kafka(
    certs: Certificates,
) -> None:
    from faust.transport.drivers.aiokafka import Transport

    from services.pipeline.faust_app import IdempotentProducer, IdempotentTransport, create_app

    kafka = Settings.from_env(env_for("SASL_SSL", "SCRAM-SHA-512", certs))
    app = create_app("planner", kafka)
    assert isinstance(app.conf.broker_credentials, SASLCredentials)
    assert app.conf.broker_session_timeout == 45.0 and app.conf.broker_heartbeat_interval == 3.0
    assert type(app.transport) is IdempotentTransport
    assert app.transport.Producer is IdempotentProducer
    tansu = create_app("planner", Settings.from_env({"MAILER_BROKER": "tansu"}))
    assert type(tansu.transport) is Transport and tansu.conf.broker_credentials is None
    assert tansu.conf.broker_session_timeout == 6.0


async def test_faust_producer_asks_aiokafka_for_idempotence_and_acks_all_on_kafka_only() -> None:
    from services.pipeline.faust_app import IdempotentProducer, create_app

    producer = create_app("planner", Settings()).producer
    assert isinstance(producer, IdempotentProducer)
    # what faust's _new_producer() adds to the AIOKafkaProducer arguments
    assert producer._settings_extra() == {"acks": "all", "enable_idempotence": True}
    tansu = create_app("planner", Settings.from_env({"MAILER_BROKER": "tansu"})).producer
    assert not isinstance(tansu, IdempotentProducer)
    assert "enable_idempotence" not in tansu._settings_extra()


def test_librdkafka_lines_never_reach_stderr_raw(caplog: pytest.LogCaptureFixture) -> None:
    """A client's log lines go through the reporter: one line of ours, at warning."""
    reporter = client_config(Settings(kafka_bootstrap_servers="127.0.0.1:1"))["logger"]
    with caplog.at_level(logging.DEBUG, logger="services.pipeline.kafka"):
        for _ in range(50):
            reporter.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                         "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to "
                         "ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1:1" in warnings[0].getMessage() and "KAFKA_BOOTSTRAP_SERVERS" in warnings[0].getMessage()
