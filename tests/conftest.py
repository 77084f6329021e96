"""Fixtures: the real broker, Postgres, Redis and SMTP, from wherever they are.

The broker is Apache Kafka (`TEST_KAFKA_BOOTSTRAP_SERVERS`, else one KRaft node
started from the jars `make kafka` resolves); tests marked `tansu_smoke` run
on the embedded tansu broker too. Postgres and Redis come from, in order: a URL
in the environment (`TEST_DATABASE_URL`, `TEST_REDIS_URL`); testcontainers when
a Docker engine answers; otherwise a PostgreSQL cluster and a redis-server the
tests start for themselves (services/pipeline/local_servers.py).
Every test gets its own database, topic prefix and consumer-group prefix, so
tests never see each other's messages.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis

from services.pipeline.embedded import free_port, start_broker
from services.pipeline.kafka_local import start_kafka
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.migrations import migrate
from services.pipeline.settings import Settings
from tests.support.poll import API_ACTOR, API_TOKEN, write_token_file
from tests.support.processes import ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_engine() -> bool:
    """Whether testcontainers can be used."""
    return _docker_answers()


#: The brokers the pipeline supports: Apache Kafka (production, and every integration test by
#: default) and tansu (the demo's zero-setup broker). A test marked `tansu_smoke` runs on both.
BROKERS = ("kafka", "tansu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the `tansu_smoke` tests once per broker; every other test on Apache Kafka only."""
    if "broker_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker("tansu_smoke"):
        metafunc.parametrize("broker_kind", BROKERS)


@pytest.fixture
def broker_kind() -> str:
    """Which broker a test runs on (`kafka` unless the test is marked `tansu_smoke`)."""
    return "kafka"


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of Apache Kafka: `TEST_KAFKA_BOOTSTRAP_SERVERS`, else a one-node
    KRaft broker started from the jars `make kafka` resolved (services/pipeline/kafka_local.py)."""
    if url := os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS"):
        yield url
        return
    cluster = start_kafka(tmp_path_factory.mktemp("kafka"))
    try:
        yield cluster.bootstrap_servers
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tansu_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of the embedded tansu broker (started on first use)."""
    broker = start_broker(run_dir=tmp_path_factory.mktemp("tansu"))
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(broker_kind: str, request: pytest.FixtureRequest) -> str:
    """Bootstrap servers of the broker this test runs on."""
    return str(request.getfixturevalue("tansu_bootstrap" if broker_kind == "tansu" else "apache_kafka"))


@pytest.fixture(scope="session")
def postgres_server(docker_engine: bool) -> Iterator[str]:
    """URL of a Postgres server's maintenance database."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
    elif docker_engine:
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        from services.pipeline.local_servers import local_postgres

        with local_postgres() as server:
            yield server.url


@pytest.fixture(scope="session")
def redis_url(docker_engine: bool) -> Iterator[str]:
    """URL of a real Redis."""
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
    elif docker_engine:
        from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

        with RedisContainer("redis:7") as r:
            yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
    else:
        from services.pipeline.local_servers import local_redis

        with local_redis() as server:
            yield server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client (strings decoded) on the test Redis."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def keys(redis_client: aioredis.Redis) -> AsyncIterator[LimiterKeys]:
    """Limiter key names under a prefix of this test's own; its keys are deleted afterwards."""
    keys = LimiterKeys(f"t{uuid.uuid4().hex[:10]}")
    yield keys
    stale = [k async for k in redis_client.scan_iter(match="{" + keys.prefix + "}:*", count=1000)]
    if stale:
        await redis_client.delete(*stale)


@pytest.fixture
def database_url(postgres_server: str) -> Iterator[str]:
    """A fresh, migrated database for one test; dropped afterwards."""
    name = f"mailer_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(postgres_server, name)
    migrate(url)
    yield url
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_database(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) in this process, recording every delivery."""
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(kafka_bootstrap: str, broker_kind: str, database_url: str, redis_url: str,
             smtp_server: SmtpServer, tmp_path: Path) -> Settings:
    """Settings of one isolated pipeline: own topics, groups, database and ports; an API
    tokens file holding the `ops` token `tests.support.poll.API_TOKEN` (what `get_json` sends)."""
    run = uuid.uuid4().hex[:8]
    return replace(
        Settings(),
        kafka_bootstrap_servers=kafka_bootstrap,
        broker_kind=broker_kind,
        # a killed sender's partitions move within seconds (Kafka's own default is 45 s)
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        database_url=database_url,
        redis_url=redis_url,
        topic_prefix=f"t{run}.",
        app_id_prefix=f"t{run}",
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.port,
        http_host="127.0.0.1",
        http_port=free_port(),
        reconciler_batch_seconds=0.2,
        redis_key_prefix=f"t{run}",
        # no limits unless a test sets them: tests run at any hour of any day
        hourly_rate=0,
        daily_limit_per_manager=0,
        working_hours="00:00-24:00",
        working_days="1-7",
        release_interval=0.2,
        api_tokens_file=write_token_file(tmp_path / "api_tokens.json", (API_TOKEN, API_ACTOR, "ops")),
    )


@pytest.fixture
def services(settings: Settings, tmp_path: Path) -> Iterator[ServiceRunner]:
    """Starts `mailer <service>` processes for the test; stops them with SIGTERM after.

    The registry's topics are created first, as the services would, so that a
    test producing before a service is up does not auto-create a topic.
    """
    with run_services(settings, tmp_path / "logs") as runner:
        yield runner


@pytest.fixture
def sql(database_url: str) -> Iterator[Callable[..., list[tuple]]]:
    """Run a query against the test's database and return its rows."""
    conn = psycopg.connect(database_url, autocommit=True)

    def query(statement: str, *params: object) -> list[tuple]:
        return list(conn.execute(statement, params or None).fetchall())

    yield query
    with contextlib.suppress(Exception):
        conn.close()
