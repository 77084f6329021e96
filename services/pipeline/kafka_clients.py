"""How every Kafka client of the pipeline connects: one librdkafka config, one faust credential.

Contract: `client_config(settings)` is the librdkafka configuration every
confluent-kafka client starts from (the services' producer, the admin client
creating topics, the lag reader, `mailer publish`, the ops commands, the tests'
readers and the benchmarks): `bootstrap.servers`, `security.protocol`, the SASL
mechanism, user and password (MAILER_KAFKA_SASL_PASSWORD_FILE wins), the CA,
client certificate and key, and the `error_cb` and `logger` of a
`BrokerReporter` (services/pipeline/kafka_problems.py), so that librdkafka's
repeated errors become one line of ours. `faust_credentials(settings)` is the
same security for faust's aiokafka transport: None for PLAINTEXT,
`faust.SSLCredentials` for SSL, `faust.SASLCredentials` (with an SSL context for
SASL_SSL) otherwise. Both read the settings as `Settings.check()` validated them;
neither logs nor returns the password anywhere but in the config itself.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust
from faust.types.auth import CredentialsT

from services.pipeline.kafka_problems import BrokerReporter
from services.pipeline.settings import Settings


def security_config(settings: Settings) -> dict[str, str]:
    """The librdkafka keys of the configured security protocol (no callbacks)."""
    protocol = settings.kafka_security_protocol
    config = {"bootstrap.servers": settings.kafka_bootstrap_servers, "security.protocol": protocol}
    if protocol.startswith("SASL_"):
        config["sasl.mechanisms"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_secret()
    if protocol.endswith("SSL"):
        for key, path in (("ssl.ca.location", settings.kafka_ssl_ca_file),
                          ("ssl.certificate.location", settings.kafka_ssl_cert_file),
                          ("ssl.key.location", settings.kafka_ssl_key_file)):
            if path:
                config[key] = path
        if settings.kafka_ssl_cert_file and not settings.kafka_ssl_key_file:
            config["ssl.key.location"] = settings.kafka_ssl_cert_file  # key and certificate in one PEM
    return config


def client_config(
    settings: Settings, *, client_id: str | None = None, reporter: BrokerReporter | None = None,
) -> dict[str, Any]:
    """The base configuration of one confluent-kafka client; add the client's own keys to it.

    `reporter` receives the client's errors and log lines (default: a new one logging to
    `services.pipeline.kafka`); keep it to ask what went wrong when the client gives up.
    """
    config: dict[str, Any] = dict(security_config(settings))
    if client_id:
        config["client.id"] = client_id
    reporter = reporter or BrokerReporter(settings)
    config["error_cb"] = reporter.on_error
    config["logger"] = reporter
    return config


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of aiokafka: the configured CA (else the system's), the client
    certificate when one is set, host names checked (as librdkafka does)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=settings.kafka_ssl_ca_file or None
    )
    if settings.kafka_ssl_cert_file:
        context.load_cert_chain(settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file or None)
    return context


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """faust's `broker_credentials` for the configured security protocol."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    credentials = faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_secret(),
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
        mechanism=settings.kafka_sasl_mechanism,
    )
    return credentials
