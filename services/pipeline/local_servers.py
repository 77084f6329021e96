"""PostgreSQL and Redis servers of our own, for the tests and the benchmarks (no URL given, no Docker).

Contract: `local_postgres()` runs `initdb` into a fresh temporary folder and a
`postgres` listening only on 127.0.0.1 at a free port (trust authentication,
no fsync unless `durable`, `max_connections` 300); `local_redis()` runs a `redis-server` on a
free loopback port with no persistence and a folder of its own. Each yields a
`LocalServer` once the server answers queries (`SELECT 1`, `PING`) and stops it
on exit (Postgres: SIGINT, the fast shutdown of `pg_ctl stop -m fast`; Redis:
SIGTERM), then deletes its folder. Logs are files in that folder; a server that
does not start raises `LocalServerError` with its log's tail (the folder is kept).
initdb and postgres refuse to run as root: when the effective uid is 0 they run
as the `postgres` system user, which owns the folder. Where `setpriv` exists, a
server also gets its parent-death signal, so a killed test run leaves none behind.
A missing binary raises `LocalServerError` saying that `make tools` installs it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.pipeline.embedded import free_port, log_tail, redis_answers

INSTALL_HINT = "`make tools` installs it (Debian packages postgresql and redis-server, as root)"
SERVER_USER = "postgres"  # created by Debian's postgresql-common
START_TIMEOUT = 60.0
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
_BIND_FAILED = re.compile(r"could not bind|address already in use", re.IGNORECASE)


class LocalServerError(RuntimeError):
    """A local server could not be found or started; the message says why."""


@dataclass
class LocalServer:
    """A server child process, the URL to reach it and the folder it owns."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path
    stop_signal: signal.Signals
    started_in: float = 0.0  # seconds from launch to the first answer

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (`stop_signal`, then SIGKILL after `timeout` s) and delete its folder."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- binaries and users --------------------------------------------------------------


def postgres_bindir() -> Path:
    """The folder of `initdb` and `postgres`: `pg_config --bindir`, else the newest Debian one."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: _version_key(p.parent.name), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise LocalServerError(f"PostgreSQL's initdb and postgres were not found; {INSTALL_HINT}")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def redis_binary() -> Path:
    """`redis-server` on PATH."""
    path = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if not path:
        raise LocalServerError(f"redis-server was not found on PATH; {INSTALL_HINT}")
    return Path(path)


def _as_server_user() -> dict[str, Any]:
    """Popen arguments that drop root to the `postgres` user (none when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise LocalServerError(
            f"initdb and postgres refuse to run as root and there is no `{SERVER_USER}` user "
            f"to run them as; {INSTALL_HINT}"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _dies_with_parent(argv: list[str], sig: signal.Signals) -> list[str]:
    """`argv` run through `setpriv --pdeathsig` when there is one: the server gets `sig`
    when the test process dies, even by SIGKILL."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig.name, "--", *argv] if setpriv else argv


def _folder(prefix: str, owner: dict[str, Any]) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    if owner:
        os.chown(directory, owner["user"], owner["group"])
    return directory


# --- starting ---------------------------------------------------------------------


def _launch(
    name: str, argv: list[str], directory: Path, log_name: str, url: str,
    answers: Callable[[str], bool], stop_signal: signal.Signals, popen: dict[str, Any],
) -> LocalServer:
    """Start `argv` with its output in `directory/log_name`; return once `answers(url)`."""
    log_path = directory / log_name
    started = time.monotonic()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _dies_with_parent(argv, stop_signal), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=directory, start_new_session=True, **popen,
        )
    server = LocalServer(name, url, process, directory, log_path, stop_signal)
    deadline = started + START_TIMEOUT
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            how = (f"exited with status {process.returncode}" if process.poll() is not None
                   else f"did not answer within {START_TIMEOUT:.0f}s")
            with contextlib.suppress(Exception):
                server.process.kill()
                server.process.wait(5)
            raise LocalServerError(
                f"{name} {how}; last lines of {log_path}:\n" + (log_tail(log_path) or "(empty log)")
            )
        time.sleep(0.1)
    server.started_in = time.monotonic() - started
    return server


def _start_with_retries(start: Callable[[int], LocalServer]) -> LocalServer:
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return start(free_port())
        except LocalServerError as exc:
            if attempt == START_ATTEMPTS or not _BIND_FAILED.search(str(exc)):
                raise
    raise AssertionError("unreachable")


def _postgres_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def start_postgres(max_connections: int = 300, durable: bool = False) -> LocalServer:
    """initdb into a new temporary folder and start postgres on it; see the module docstring.
    `durable`: keep fsync and synchronous commit on (the benchmarks measure what production
    pays); otherwise durability is traded for speed, as tests want."""
    bindir = postgres_bindir()
    owner = _as_server_user()
    directory = _folder("mailer-test-pg-", owner)
    pgdata = directory / "pgdata"
    initdb_log = directory / "initdb.log"
    with initdb_log.open("ab") as log:
        code = subprocess.run(
            [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory,
            timeout=120, check=False, **owner,
        ).returncode
    if code != 0:
        raise LocalServerError(f"initdb exited with status {code}; last lines of {initdb_log}:\n"
                               + (log_tail(initdb_log) or "(empty log)"))

    def start(port: int) -> LocalServer:
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(port),
            "unix_socket_directories": "",  # TCP only: no socket path, no /var/run/postgresql
            "max_connections": str(max_connections),
        }
        if not durable:  # a throwaway cluster: durability traded for speed
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        argv = [str(bindir / "postgres"), "-D", str(pgdata)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return _launch("postgres", argv, directory, "postgres.log",
                       f"postgresql://postgres@127.0.0.1:{port}/postgres", _postgres_answers,
                       signal.SIGINT, owner)

    return _start_with_retries(start)


def _redis_answers(url: str) -> bool:
    return redis_answers(url, timeout=1.0)


def start_redis() -> LocalServer:
    """Start redis-server in a new temporary folder; see the module docstring."""
    binary = redis_binary()
    directory = _folder("mailer-test-redis-", {})

    def start(port: int) -> LocalServer:
        argv = [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(directory),
                "--logfile", ""]
        return _launch("redis-server", argv, directory, "redis.log",
                       f"redis://127.0.0.1:{port}/0", _redis_answers, signal.SIGTERM, {})

    return _start_with_retries(start)


@contextlib.contextmanager
def local_postgres() -> Iterator[LocalServer]:
    """A PostgreSQL of our own for the `with` block."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def local_redis() -> Iterator[LocalServer]:
    """A Redis of our own for the `with` block."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
