"""`mailer demo` end to end: embedded broker, real services, one bounced recipient; on a
configured Postgres and Redis it leaves no database, row or key behind, also when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from services.pipeline.embedded import with_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_demo_sends_all_but_the_bounce(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "services.pipeline.cli", "demo", "--recipients", "300",
         "--no-progress", "--timeout", "240"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\s*recipients\s+300$", result.stdout, re.M), output
    assert re.search(r"^\s*sent\s+299$", result.stdout, re.M), output
    assert re.search(r"^\s*failed\s+1$", result.stdout, re.M), output
    assert "b***@example.com  550" in result.stdout, output
    assert "bounce-demo@example.com" not in result.stdout
    assert re.search(r"^metrics: planner http://127\.0\.0\.1:\d+/metrics, sender-1 http://\S+/metrics, "
                     r"reconciler http://\S+/metrics$", result.stdout, re.M), output
    assert list((tmp_path / ".demo").iterdir()), "no run directory"


def _configured_env(postgres_server: str, database_url: str, redis_url: str) -> dict[str, str]:
    """The demo's environment: the test's database and Redis as the configured ones, and no
    broker (the demo starts its own tansu)."""
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    dbname = str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"])
    env["DATABASE_URL"] = with_database(postgres_server, dbname)  # URL form, as users write it
    env["REDIS_URL"] = redis_url
    return env


def _databases(postgres_server: str) -> set[str]:
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def _keys(redis_url: str) -> set[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return set(client.scan_iter(count=1000))
    finally:
        client.close()


def _assert_left_as_found(output: str, postgres_server: str, redis_url: str, databases: set[str],
                          keys: set[bytes], sql: Callable[..., list[tuple]]) -> None:
    assert re.search(r"^postgres: database mailer_demo_\w+ of its own \(dropped at the end\) "
                     r"on the configured Postgres postgresql://", output, re.M), output
    assert re.search(r"^postgres: dropped the demo's database mailer_demo_\w+$", output, re.M), output
    assert re.search(r"^redis: configured Redis redis://\S+, keys \{\S+-demo-\S+\}:\* only", output,
                     re.M), output
    deleted = re.search(r"^redis: deleted the demo's (\d+) keys", output, re.M)
    assert deleted and int(deleted[1]) > 0, output  # it did write there, and cleaned up
    for url in (postgres_server, redis_url):
        if password := urlsplit(url).password:
            assert password not in output
    assert _databases(postgres_server) == databases  # its own database is gone
    assert sql("SELECT count(*) FROM send_log") == [(0,)]  # the configured one is untouched
    assert sql("SELECT count(*) FROM campaigns") == [(0,)]
    assert _keys(redis_url) - keys == set()  # no key of the demo's is left


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_demo_on_configured_postgres_and_redis_leaves_nothing_behind(
    postgres_server: str, database_url: str, redis_url: str, sql: Callable[..., list[tuple]],
    tmp_path: Path,
) -> None:
    databases, keys = _databases(postgres_server), _keys(redis_url)
    result = subprocess.run(
        [sys.executable, "-m", "services.pipeline.cli", "demo", "--recipients", "20",
         "--no-progress", "--timeout", "120"],
        cwd=tmp_path, env=_configured_env(postgres_server, database_url, redis_url),
        capture_output=True, text=True, timeout=200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\s*sent\s+19$", result.stdout, re.M), output
    _assert_left_as_found(output, postgres_server, redis_url, databases, keys, sql)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_interrupted_demo_drops_its_database_and_keys(
    postgres_server: str, database_url: str, redis_url: str, sql: Callable[..., list[tuple]],
    tmp_path: Path,
) -> None:
    databases, keys = _databases(postgres_server), _keys(redis_url)
    demo = subprocess.Popen(
        [sys.executable, "-m", "services.pipeline.cli", "demo", "--recipients", "2000",
         "--no-progress", "--timeout", "120"],
        cwd=tmp_path, env=_configured_env(postgres_server, database_url, redis_url),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the campaign is under way once it is published
            lines.append(line)
            if line.startswith("published in"):
                break
        time.sleep(0.5)
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(lines) + rest
    assert demo.returncode == 130, output
    assert "demo interrupted" in output
    _assert_left_as_found(output, postgres_server, redis_url, databases, keys, sql)
