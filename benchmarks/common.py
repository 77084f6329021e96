"""What every benchmark shares: one run's infrastructure, the services it starts, the figures.

Contract: `BenchRun` (a context manager) starts a fresh broker — tansu, or with
`broker="kafka"` a one-node Apache Kafka (services/pipeline/kafka_local.py) — or
uses KAFKA_BOOTSTRAP_SERVERS when it is set, and postfix's `smtp-sink` on a free
port; Postgres and Redis are the configured servers when `DATABASE_URL` and
`REDIS_URL` are set, otherwise servers of its own (services/pipeline/local_servers.py;
Postgres with fsync on, as in production). `run.settings(name)` gives one benchmark's settings: a fresh,
migrated Postgres database of its own (dropped when the run ends), its own
topic, consumer-group and Redis key prefixes, every sending limit lifted, the
topics created and the limiter's epoch set. `run.start_service()` starts `mailer planner|sender|reconciler`
as a child process; `stop_service()` stops it with SIGTERM and returns its peak
RSS (VmHWM, read just before the stop). Everything started is stopped on exit,
also on error. `Figure` is one measured figure beside the raw baseline measured
in the same run; `figures_table()` formats them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from services.pipeline.contract import Message, encode
from services.pipeline.demo import settings_env
from services.pipeline.embedded import free_port, log_tail, port_open, start_broker, stop_processes
from services.pipeline.kafka_clients import client_config
from services.pipeline.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMTP_SINK_HINT = "install Debian's postfix (make tools, as root) for /usr/sbin/smtp-sink"


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says why."""


# --- figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure beside its raw baseline from the same run.

    `ratio` is value / baseline; `target` is its least and `target_max` its greatest
    acceptable value (peak RSS growth is the 100,000-recipient run's over the 10,000's).
    """

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    target: float | None = None  # least acceptable value / baseline
    target_max: float | None = None  # greatest acceptable value / baseline
    note: str = ""

    @property
    def ratio(self) -> float:
        """value / baseline (0 when the baseline is 0)."""
        return self.value / self.baseline if self.baseline else 0.0

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets the target; None when there is none."""
        if self.target is None and self.target_max is None:
            return None
        low_ok = self.target is None or self.ratio >= self.target
        high_ok = self.target_max is None or self.ratio <= self.target_max
        return low_ok and high_ok

    def as_dict(self) -> dict[str, Any]:
        """The figure as JSON-ready fields (for results.json)."""
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def _number(value: float, unit: str) -> str:
    if unit == "MiB":
        return f"{value:,.1f} {unit}"
    if unit == "s":
        return f"{value:,.2f} {unit}"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def _target(figure: Figure) -> str:
    if figure.target is not None and figure.target_max is not None:
        return f"{figure.target:.2f}..{figure.target_max:.2f}"
    if figure.target is not None:
        return f">= {figure.target:.2f}"
    if figure.target_max is not None:
        return f"<= {figure.target_max:.2f}"
    return "-"


def figures_table(figures: list[Figure]) -> str:
    """The figures as an aligned text table: figure, baseline, ratio, target, verdict."""
    header = ("figure", "value", "raw baseline", "baseline", "ratio", "target", "")
    rows = [header]
    for f in figures:
        verdict = {True: "met", False: "MISSED", None: ""}[f.met]
        rows.append((f.name, _number(f.value, f.unit), f.baseline_name,
                     _number(f.baseline, f.unit), f"{f.ratio:.2f}", _target(f), verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i in (0, 2) else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def say(text: str) -> None:
    """Progress on stdout, flushed (benchmarks run for minutes)."""
    print(text, flush=True)


# --- processes ------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The peak resident set (VmHWM) of a live process, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmHWM line")


@dataclass
class Service:
    """A `mailer` service child process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check(self) -> None:
        """Raise `BenchError` with the log tail when the process has exited."""
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.process.returncode}; "
                             f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")


# --- the run ----------------------------------------------------------------------------


class BenchRun:
    """The infrastructure of one benchmark run (see the module docstring)."""

    def __init__(self, base: Settings, run_dir: Path, broker: str = "tansu") -> None:
        self.base = base
        self.run_dir = run_dir
        self.broker = broker
        self.stamp = run_dir.name
        self._stoppers: list[tuple[str, Callable[[], None]]] = []
        self._services: list[Service] = []
        self._databases: list[str] = []
        self.bootstrap = ""
        self.smtp_port = 0

    def __enter__(self) -> BenchRun:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        self._start_postgres_and_redis()
        if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:
            self.bootstrap = self.base.kafka_bootstrap_servers
            say(f"broker: {self.bootstrap} (KAFKA_BOOTSTRAP_SERVERS, {self.broker})")
        elif self.broker == "kafka":
            from services.pipeline.kafka_local import KAFKA_VERSION, start_kafka

            cluster = start_kafka(self.run_dir / "kafka")
            self._stoppers.append(("broker", cluster.stop))
            self.bootstrap = cluster.bootstrap_servers
            say(f"broker: Apache Kafka {KAFKA_VERSION} (one KRaft node) on {self.bootstrap}")
        else:
            broker = start_broker(run_dir=self.run_dir)
            self._stoppers.append(("broker", broker.stop))
            self.bootstrap = broker.bootstrap_servers
            say(f"broker: embedded tansu on {self.bootstrap}")
        self.smtp_port = self._start_smtp_sink()
        say(f"smtp sink: postfix smtp-sink on 127.0.0.1:{self.smtp_port}")

    def _start_postgres_and_redis(self) -> None:
        """Our own Postgres and Redis unless DATABASE_URL / REDIS_URL name configured ones."""
        from services.pipeline.embedded import mask_url
        from services.pipeline.local_servers import start_postgres, start_redis

        if "DATABASE_URL" in os.environ:
            say(f"postgres: {mask_url(self.base.database_url)} (DATABASE_URL)")
        else:
            postgres = start_postgres(durable=True)
            self._stoppers.append(("postgres", postgres.stop))
            self.base = dataclasses.replace(self.base, database_url=postgres.url)
            say(f"postgres: our own on {postgres.url} (fsync on)")
        if "REDIS_URL" in os.environ:
            say(f"redis: {mask_url(self.base.redis_url)} (REDIS_URL)")
        else:
            redis = start_redis()
            self._stoppers.append(("redis", redis.stop))
            self.base = dataclasses.replace(self.base, redis_url=redis.url)
            say(f"redis: our own on {redis.url}")

    def _start_smtp_sink(self) -> int:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(binary).exists():
            raise BenchError(f"smtp-sink not found: {SMTP_SINK_HINT}")
        port = free_port()
        argv = [binary, "-c"]  # -c: count; no per-session output
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        argv += [f"127.0.0.1:{port}", "1024"]  # backlog
        log_path = self.run_dir / "smtp-sink.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._stoppers.append(("smtp-sink", lambda: stop_processes([proc], timeout=5.0)))
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"smtp-sink did not start: {log_tail(log_path)}")
            time.sleep(0.05)
        return port

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings of benchmark `name`: own database, topics, groups and Redis keys, no limits."""
        from services.pipeline.kafka_admin import ensure_topics
        from services.pipeline.migrations import migrate
        from services.reconciler.limiter_state import restore_limiter

        database = f"mailer_bench_{name}_{secrets.token_hex(3)}"
        with psycopg.connect(self._server_url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        self._databases.append(database)
        url = self._server_url(database)
        migrate(url)
        tag = f"bench-{self.stamp}-{name}"
        fields: dict[str, Any] = {
            "kafka_bootstrap_servers": self.bootstrap,
            "broker_kind": self.broker,
            "database_url": url,
            "topic_prefix": f"{tag}.",
            "app_id_prefix": tag,
            "redis_key_prefix": tag,
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtp_port,
            "smtp_tls": "none",
            "smtp_username": "",
            "smtp_password": "",
            "smtp_password_file": "",
            "http_host": "127.0.0.1",
            "http_port": free_port(),
            "hourly_rate": 0,
            "daily_limit_per_manager": 0,
            "working_hours": "00:00-24:00",
            "working_days": "1-7",
            "max_campaign_recipients": 1_000_000,
            "confirm_campaign_recipients": 1_000_000,
            "warn_campaign_recipients": 1_000_000,
            "starts_per_hour": 1_000_000,
            "max_active_campaigns": 1_000,
        }
        fields.update(overrides)
        settings = dataclasses.replace(self.base, **fields)
        ensure_topics(settings, timeout=30.0)
        asyncio.run(restore_limiter(settings))  # the limiter's epoch, as `mailer migrate` sets it
        return settings

    def _server_url(self, database: str) -> str:
        """The configured Postgres server's URL for `database`."""
        parts = urlsplit(self.base.database_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))

    def start_service(self, name: str, command: str, settings: Settings,
                      *args: str) -> Service:
        """Start `mailer <command> <args>` as `name`, with `settings` in its environment."""
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        log_path = self.run_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.pipeline.cli", command, *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        service = Service(name, proc, log_path)
        self._services.append(service)
        return service

    def stop_service(self, service: Service) -> float:
        """Stop `service` (SIGTERM); return its peak RSS in MiB."""
        service.check()
        peak = peak_rss_mib(service.process.pid)
        stop_processes([service.process], timeout=20.0)
        return peak

    def settle(self) -> None:
        """Between two benchmarks: stop their services, drop their databases and checkpoint,
        so that no benchmark pays for the writes of the one before it."""
        stop_processes([s.process for s in self._services], timeout=20.0)
        self._services.clear()
        self._drop_databases()
        with contextlib.suppress(psycopg.Error), \
                psycopg.connect(self._server_url("postgres"), autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def close(self) -> None:
        """Stop the services; drop the databases (while their server still runs); stop the
        sink, the broker and the servers of our own."""
        stop_processes([s.process for s in self._services], timeout=20.0)
        self._drop_databases()
        while self._stoppers:
            name, stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception as exc:  # keep stopping the rest
                say(f"could not stop {name}: {exc}")

    def _drop_databases(self) -> None:
        for database in self._databases:
            with contextlib.suppress(psycopg.Error), \
                    psycopg.connect(self._server_url("postgres"), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self._databases.clear()


# --- reading topics -----------------------------------------------------------------------


@dataclass
class TopicSpan:
    """How many messages a topic holds and the span of their timestamps (s)."""

    count: int
    first: float
    last: float

    @property
    def seconds(self) -> float:
        """Seconds from the first message's timestamp to the last's."""
        return max(self.last - self.first, 1e-3)

    @property
    def rate(self) -> float:
        """Messages per second over the span."""
        return self.count / self.seconds


def read_span(settings: Settings, topic: str, expect: int, *, timeout: float,
              check: Callable[[], None] = lambda: None,
              on_message: Callable[[bytes], None] | None = None,
              progress: Callable[[int], None] | None = None) -> TopicSpan:
    """Read `topic` from the start until `expect` messages arrived; their timestamp span.

    Raises `BenchError` after `timeout` s. `check()` runs about once a second (a
    service that died raises there); `on_message` sees every value.
    """
    consumer = Consumer({
        **client_config(settings),
        "group.id": f"bench-reader-{secrets.token_hex(4)}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    count, first, last = 0, float("inf"), 0.0
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 1.0
    try:
        while count < expect:
            for msg in consumer.consume(10_000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise BenchError(f"reading {topic}: {err}")
                stamp = msg.timestamp()[1] / 1000
                first, last = min(first, stamp), max(last, stamp)
                count += 1
                if on_message is not None:
                    on_message(msg.value() or b"")
            now = time.monotonic()
            if now >= next_check:
                check()
                if progress is not None:
                    progress(count)
                next_check = now + 1.0
            if now > deadline:
                raise BenchError(f"{topic}: {count} of {expect} messages after {timeout:.0f}s")
    finally:
        consumer.close()
    return TopicSpan(count, first, last)


def produce_messages(producer: Producer, topic: str, messages: Iterable[Message],
                     on_delivery: Callable[..., None] | None = None) -> int:
    """Produce `messages` keyed by send id (waiting out a full queue); how many. The caller
    flushes."""
    count = 0
    for message in messages:
        while True:
            try:
                producer.produce(topic, value=encode(message), key=message["send_id"],
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    return count


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """`with timed() as elapsed:`; elapsed() is the seconds since the block began."""
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start
