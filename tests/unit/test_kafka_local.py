"""The local Apache Kafka's pinned version and generated configuration (no broker started)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from services.pipeline.kafka_local import (
    KAFKA_VERSION,
    KafkaLocalError,
    KafkaNode,
    SecureListener,
    libs_dir,
    new_cluster_id,
    server_properties,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_pom_and_docker_compose_run_the_version_the_launcher_expects() -> None:
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    assert re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)[1] == KAFKA_VERSION  # type: ignore[index]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_a_cluster_id_is_a_kafka_uuid() -> None:
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    for cluster_id in ids:
        assert len(cluster_id) == 22 and "=" not in cluster_id
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
        # kafka-storage reads an id starting with "-" as an option (1 in 64 drawn did: a CI
        # run failed "argument --cluster-id/-t: expected one argument")
        assert not cluster_id.startswith("-")


def _node(tmp_path: Path, secure: bool = False) -> KafkaNode:
    return KafkaNode(node_id=2, port=19092, controller_port=19093,
                     secure_port=19094 if secure else None, folder=tmp_path)


def test_a_node_of_three_replicates_the_internal_topics_and_refuses_unclean_elections(tmp_path: Path) -> None:
    props = server_properties(_node(tmp_path), "1@127.0.0.1:1,2@127.0.0.1:2,3@127.0.0.1:3", 3)
    assert props["node.id"] == "2" and props["process.roles"] == "broker,controller"
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"
    assert props["auto.create.topics.enable"] == "false"  # as in docker-compose.yml: services create them
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "data")
    single = server_properties(_node(tmp_path), "2@127.0.0.1:19093", 1)
    assert single["offsets.topic.replication.factor"] == "1"
    assert single["transaction.state.log.min.isr"] == "1"


def test_a_secure_listener_is_sasl_ssl_with_scram_and_a_pem_key_store(tmp_path: Path) -> None:
    listener = SecureListener(keystore_pem=tmp_path / "server.pem", users={"crm": "s3cret"},
                              client_ca_file=tmp_path / "ca.pem")
    props = server_properties(_node(tmp_path, secure=True), "2@127.0.0.1:19093", 1, listener)
    assert "SECURE://localhost:19094" in props["advertised.listeners"]
    assert "SECURE:SASL_SSL" in props["listener.security.protocol.map"]
    assert props["listener.name.secure.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert "ScramLoginModule" in props["listener.name.secure.scram-sha-512.sasl.jaas.config"]
    assert props["listener.name.secure.ssl.keystore.type"] == "PEM"
    assert props["listener.name.secure.ssl.client.auth"] == "required"
    assert "s3cret" not in "".join(props.values())  # SCRAM users go into storage at format time
    assert props["inter.broker.listener.name"] == "PLAINTEXT"


def test_missing_jars_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_KAFKA_LIBS", str(tmp_path))
    with pytest.raises(KafkaLocalError, match="run `make kafka`"):
        libs_dir()
