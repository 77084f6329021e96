"""docker-compose.yml: the services exist and use only real commands and settings."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.pipeline.cli import build_parser
from services.pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OUR_IMAGE = "campaign-mailer"
REQUIRED = ("kafka", "postgres", "redis", "mailpit", "migrate", "planner", "reconciler")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _ours(service: dict[str, Any]) -> bool:
    """Whether the service runs the mailer image (built from deploy/)."""
    return "build" in service or str(service.get("image", "")).startswith(OUR_IMAGE)


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command or []]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("mailer has no subcommands")


def _replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def test_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in REQUIRED if name not in services]
    assert not missing, f"missing services: {missing}"
    senders = sum(
        _replicas(s) for s in services.values() if _ours(s) and _argv(s)[1:] == ["sender"]
    )
    assert senders >= 2, "expected two sender processes"


def test_our_services_run_mailer_subcommands(services: dict[str, dict[str, Any]]) -> None:
    known = _subcommands()
    ours = {name: s for name, s in services.items() if _ours(s)}
    assert set(ours) >= {"migrate", "planner", "reconciler"}
    for name, service in ours.items():
        argv = _argv(service)
        assert len(argv) == 2 and argv[0] == "mailer", f"{name}: command {argv}"
        assert argv[1] in known, f"{name}: `mailer {argv[1]}` is not a subcommand"
    assert _argv(services["migrate"]) == ["mailer", "migrate"]
    assert _argv(services["planner"]) == ["mailer", "planner"]
    assert _argv(services["reconciler"]) == ["mailer", "reconciler"]


def test_our_services_set_only_real_settings(services: dict[str, dict[str, Any]]) -> None:
    real = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    for name, service in services.items():
        if not _ours(service):
            continue
        env = _environment(service)
        unknown = sorted(set(env) - real)
        assert not unknown, f"{name}: not settings: {unknown}"
        assert env.get("KAFKA_BOOTSTRAP_SERVERS"), name
        assert env.get("DATABASE_URL"), name
        # every value parses the way the service will parse it
        Settings.from_env(env)


def test_services_point_at_the_compose_infrastructure(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["sender-1" if "sender-1" in services else "sender"])
    settings = Settings.from_env(env)
    assert settings.kafka_bootstrap_servers.split(":")[0] == "kafka"
    assert "@postgres:" in settings.database_url
    assert settings.redis_url.startswith("redis://redis:")
    assert (settings.smtp_host, settings.smtp_port) == ("mailpit", 1025)
    reconciler = Settings.from_env(_environment(services["reconciler"]))
    ports = [str(p) for p in services["reconciler"].get("ports", [])]
    assert any(p.endswith(f":{reconciler.http_port}") for p in ports)
    assert reconciler.http_port == 8080


def test_kafka_is_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    env = _environment(kafka)
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    assert env.get("KAFKA_CONTROLLER_QUORUM_VOTERS")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    for name, service in services.items():
        assert "zookeeper" not in name.lower()
        assert "zookeeper" not in str(service.get("image", "")).lower()
        assert not any("ZOOKEEPER" in key for key in _environment(service)), name


def test_dependencies_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: use the long depends_on form"
        for target, rule in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("planner", "reconciler"):
        rule = services[name]["depends_on"]["migrate"]
        assert rule["condition"] == "service_completed_successfully"


def test_image_build_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        if isinstance(build, str):
            build = {"context": build}
        context = ROOT / build.get("context", ".")
        dockerfile = build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).is_file(), f"{name}: no {dockerfile}"
    text = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install -e ." in text  # editable: schemas/ is found beside services/


def test_the_reconcilers_api_tokens_file_is_mounted_and_valid(services: dict[str, dict[str, Any]]) -> None:
    from services.pipeline.api_tokens import load_api_tokens

    reconciler = services["reconciler"]
    inside = reconciler["environment"]["MAILER_API_TOKENS_FILE"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in reconciler["volumes"]}
    local = ROOT / mounts[inside]
    tokens = load_api_tokens(dataclasses.replace(Settings(), api_tokens_file=str(local)))
    assert tokens.lookup("change-me-compose-ops-token") is not None
