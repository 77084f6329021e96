"""Apache Kafka with a SASL_SSL listener for tests: certificates, the broker, the settings.

Contract: the module-scoped fixtures `kafka_certs` (a CA, broker and client
certificates made with openssl) and `secured_kafka` (one KRaft node from
services/pipeline/kafka_local.py with a SASL_SSL listener: SCRAM-SHA-512 user
`KAFKA_USER` whose password is `KAFKA_PASSWORD`, client certificates required)
are imported by the test modules that use them. `secure(settings, cluster,
certs)` points settings at that listener with every security setting filled.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.pipeline.kafka_local import KafkaCluster, SecureListener, start_kafka
from services.pipeline.settings import Settings
from tests.support.certificates import Certificates, make_certificates, openssl_missing

KAFKA_USER = "mailer"
KAFKA_PASSWORD = f"kafka-pw-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def kafka_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, a broker certificate for localhost, a client certificate, and an unrelated CA."""
    if reason := openssl_missing():
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secured_kafka(kafka_certs: Certificates,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One Kafka node with a SASL_SSL (SCRAM-SHA-512, mutual TLS) listener."""
    listener = SecureListener(keystore_pem=kafka_certs.broker_keystore, users={KAFKA_USER: KAFKA_PASSWORD},
                              mechanism="SCRAM-SHA-512", client_ca_file=kafka_certs.ca)
    cluster = start_kafka(tmp_path_factory.mktemp("secured-kafka"), sasl_ssl=listener)
    try:
        yield cluster
    finally:
        cluster.stop()


def secure(settings: Settings, cluster: KafkaCluster, certs: Certificates, *,
           password_file: Path | None = None) -> Settings:
    """`settings` on the cluster's SASL_SSL listener: the password in `password_file` when
    given (written here), else in MAILER_KAFKA_SASL_PASSWORD."""
    if password_file is not None:
        password_file.write_text(KAFKA_PASSWORD + "\n")
    return dataclasses.replace(
        settings,
        kafka_bootstrap_servers=cluster.secure_bootstrap_servers,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=KAFKA_USER,
        kafka_sasl_password="" if password_file else KAFKA_PASSWORD,
        kafka_sasl_password_file=str(password_file or ""),
        kafka_ssl_ca_file=str(certs.ca),
        kafka_ssl_cert_file=str(certs.client_cert),
        kafka_ssl_key_file=str(certs.client_key),
    )
