"""`mailer demo`: the whole pipeline on one machine, with a demo campaign.

Contract: `run_demo(args, settings)` starts (or reuses) the broker, Postgres
and Redis, an SMTP sink that bounces `bounce-demo@example.com`, applies the
migrations, runs planner, `args.senders` senders and the reconciler as child
processes (logs in `.demo/<stamp>/`), publishes a campaign of
`args.recipients` recipients and follows it through the reconciler's poll
endpoint, with an `ops` bearer token of its own (only its hash is written, to
`<run dir>/api_tokens.json`; the token is never printed), until it completes
or `args.timeout` passes. It prints a summary and
stops everything it started, also on error and on Ctrl-C/SIGTERM. Topic and
consumer-group names carry a per-run prefix, so runs against a shared broker
are independent. The demo writes only into a database and Redis keys of its
own: on a configured Postgres that answers it creates a fresh database
`mailer_demo_<stamp>` and drops it at the end; on a configured Redis it uses
the key prefix `<MAILER_REDIS_KEY_PREFIX>-demo-<stamp>` and deletes those keys
at the end (also on error and Ctrl-C); otherwise it starts embedded ones under
`.demo/`. Its output says which (URLs without passwords). Returns 0 only when
the campaign completed with every recipient in a terminal state; 1 on failure,
2 on bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from services.pipeline.demo_progress import (
    TERMINAL,
    PollError,
    Progress,
    counts_of,
    failed_recipients,
    fetch_campaign,
)
from services.pipeline.embedded import (
    EmbeddedError,
    delete_keys,
    free_port,
    log_tail,
    port_open,
    postgres_url,
    redis_url,
    start_broker,
    stop_processes,
)
from services.pipeline.kafka_admin import TopicsError
from services.pipeline.kafka_problems import BrokerUnavailable
from services.pipeline.redaction import mask_email
from services.pipeline.settings import Settings

BOUNCE_ADDRESS = "bounce-demo@example.com"  # the unit tests' bounce; a run uses bounce_address()


def bounce_address(stamp: str) -> str:
    """The address the run `stamp` bounces: its own, as a 550 5.1.1 puts it on the
    suppression list and the next run must show a bounce again, not a skip."""
    return f"bounce-{stamp}@example.com"
POLL_INTERVAL = 0.5
SERVICE_START_TIMEOUT = 90.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why."""


# --- child processes ---------------------------------------------------------------


@dataclass
class Child:
    """A child process of the demo and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check(self) -> None:
        """Raise `DemoError` with the log tail when the process has exited."""
        code = self.process.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise DemoError(
                f"{self.name} {how}; last lines of {self.log_path}:\n"
                + (log_tail(self.log_path) or "(empty log)")
            )


def spawn(name: str, argv: list[str], env: dict[str, str], run_dir: Path) -> Child:
    """Start `argv` with output to `<run_dir>/<name>.log`, in its own session."""
    log_path = run_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C reaches only the demo, which stops children in order
        )
    return Child(name, process, log_path)


def mailer_argv(*command: str) -> list[str]:
    """The command line of one `mailer` subcommand run by this interpreter."""
    return [sys.executable, "-m", "services.pipeline.cli", *command]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[f.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


class Cleanup:
    """Things to stop, stopped in reverse order of registration."""

    def __init__(self) -> None:
        self._stoppers: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, stopper: Callable[[], None]) -> None:
        self._stoppers.append((name, stopper))

    def run(self) -> None:
        while self._stoppers:
            name, stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception as exc:  # keep stopping the rest
                _say(f"  could not stop {name}: {exc}", err=True)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt: all stop the demo like Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let a second Ctrl-C (or a closed terminal) not cut the bounded shutdown short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *_STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(text: str, *, err: bool = False) -> None:
    """Print, ignoring a terminal that went away (shutdown must go on)."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


# --- the campaign ----------------------------------------------------------------


def demo_campaign(campaign_id: str) -> dict[str, Any]:
    """The demo campaign's start fields (everything but the recipients)."""
    return {
        "campaign_id": campaign_id,
        "manager_id": "demo-manager",
        "actor_id": "demo-manager",
        "actor_role": "manager",
        "confirmed": True,  # the demo's manager confirms its size at start (above 1,000 recipients)
        "name": "Mailer demo",
        "from": {"email": "demo@example.com", "name": "Campaign Mailer Demo"},
        "template": {
            "subject": "Hello {{ name }}, your {{ product }} demo",
            "text": "Hi {{ name }},\n\nthis is message {{ n }} of the {{ product }} demo.\n",
            "html": "<p>Hi {{ name }},</p><p>this is message {{ n }} of the "
                    "<b>{{ product }}</b> demo.</p>",
        },
        "variables": {"product": "Campaign Mailer"},
    }


def demo_recipients(count: int, bounce: str = BOUNCE_ADDRESS) -> list[dict[str, Any]]:
    """`count` recipients `demo-00001@example.com`, ...; the last one, `bounce`, bounces."""
    recipients = [
        {"email": f"demo-{i:05d}@example.com", "name": f"Demo {i}", "variables": {"n": i}}
        for i in range(1, count)
    ]
    recipients.append({"email": bounce, "name": "Bounce Demo", "variables": {"n": count}})
    return recipients


# --- the run -----------------------------------------------------------------------


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer demo`: see the module docstring."""
    if args.recipients < 1:
        print("mailer: demo: --recipients must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.chunk_size <= settings.max_chunk_recipients:
        print(f"mailer: demo: --chunk-size must be 1..{settings.max_chunk_recipients}",
              file=sys.stderr)
        return 2
    if args.senders < 1:
        print("mailer: demo: --senders must be at least 1", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    run_dir = Path(".demo") / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo run directory: {run_dir}", flush=True)
    cleanup = Cleanup()
    with _stop_signals_interrupt():
        try:
            return _run(args, settings, stamp, run_dir, cleanup)
        except KeyboardInterrupt:
            _say("\ndemo interrupted", err=True)
            return 130
        except (DemoError, EmbeddedError, PollError, BrokerUnavailable, TopicsError) as exc:
            _say(f"demo failed: {exc}", err=True)
            return 1
        except Exception as exc:
            with contextlib.suppress(OSError, ValueError):
                traceback.print_exc()
            _say(f"demo failed: {type(exc).__name__}: {exc}", err=True)
            return 1
        finally:
            with _signals_ignored():
                _say("stopping ...")
                cleanup.run()
                _say(f"stopped; logs in {run_dir}")


def _run(
    args: argparse.Namespace, settings: Settings, stamp: str, run_dir: Path, cleanup: Cleanup
) -> int:
    # 1. infrastructure
    if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:
        bootstrap = settings.kafka_bootstrap_servers
        print(f"broker: {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)", flush=True)
    else:
        broker = start_broker(run_dir=run_dir)
        cleanup.add("broker", broker.stop)
        bootstrap = broker.bootstrap_servers
        print(f"broker: embedded tansu on {bootstrap} (log {broker.log_path})", flush=True)
    database = "mailer_demo_" + stamp.replace("-", "_")
    pg = postgres_url(settings.database_url, data_dir=run_dir / "pgdata", own_database=database)
    cleanup.add("postgres", _announced(pg.stop, "" if pg.embedded else
                                       f"postgres: dropped the demo's database {database}"))
    print(f"postgres: {pg.description}", flush=True)
    key_prefix = f"{settings.redis_key_prefix}-demo-{stamp}"
    rd = redis_url(settings.redis_url, run_dir=run_dir)
    cleanup.add("redis", rd.stop)
    if rd.embedded:
        print(f"redis: {rd.description}", flush=True)
    else:
        def delete_demo_keys() -> None:
            _say(f"redis: deleted the demo's {delete_keys(rd.url, key_prefix)} keys "
                 f"{{{key_prefix}}}:*")

        cleanup.add("the demo's Redis keys", delete_demo_keys)
        print(f"redis: {rd.description}, keys {{{key_prefix}}}:* only (deleted at the end)",
              flush=True)

    smtp_port, http_port = free_port(), free_port()
    api_token, tokens_file = _api_token_file(run_dir)
    demo = dataclasses.replace(
        settings,
        kafka_bootstrap_servers=bootstrap,
        broker_kind=settings.broker_kind if "KAFKA_BOOTSTRAP_SERVERS" in os.environ else "tansu",
        database_url=pg.url,
        redis_url=rd.url,
        topic_prefix=f"{settings.topic_prefix}demo-{stamp}.",
        app_id_prefix=f"{settings.app_id_prefix}-demo-{stamp}",
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_tls="none",
        smtp_username="",
        smtp_password="",
        smtp_password_file="",
        http_host="127.0.0.1",
        http_port=http_port,
        api_tokens_file=str(tokens_file),
        # the demo shows the pipeline at full speed, at any hour: limits lifted, own Redis keys
        redis_key_prefix=key_prefix,
        hourly_rate=0,
        daily_limit_per_manager=0,
        working_hours="00:00-24:00",
        working_days="1-7",
    )
    env = {**os.environ, **settings_env(demo), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )

    # 2. SMTP sink, schema, topics
    sink = spawn("smtp-sink", mailer_argv("smtp-sink", "--port", str(smtp_port),
                                          "--reject", bounce_address(stamp)), env, run_dir)
    cleanup.add("smtp-sink", lambda: stop_processes([sink.process], timeout=5.0))
    _wait_for_port(sink, smtp_port, 20.0)
    print(f"smtp sink: 127.0.0.1:{smtp_port} (bounces {mask_email(bounce_address(stamp))})",
          flush=True)
    _migrate(demo.database_url)
    from services.reconciler.limiter_state import restore_limiter

    asyncio.run(restore_limiter(demo))
    from services.pipeline.kafka_admin import ensure_topics

    ensure_topics(demo, timeout=30.0)

    # 3. services (stopped together, before the sink and the infrastructure)
    names = ["planner", *(f"sender-{i}" for i in range(1, args.senders + 1)), "reconciler"]
    services: list[Child] = []
    cleanup.add("services", lambda: stop_processes([c.process for c in services], timeout=15.0))
    metrics_ports = {name: free_port() for name in names}
    for name in names:
        services.append(spawn(name, mailer_argv(name.split("-")[0], "--metrics-port",
                                                str(metrics_ports[name])), env, run_dir))
    children = [*services, sink]
    print(f"services: {', '.join(names)} (logs in {run_dir})", flush=True)
    print("metrics: " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics"
                                  for name, port in metrics_ports.items()), flush=True)
    started = time.monotonic()
    while not port_open("127.0.0.1", http_port):
        for child in children:
            child.check()
        if time.monotonic() - started > SERVICE_START_TIMEOUT:
            raise DemoError(f"the reconciler's endpoint did not open within "
                            f"{SERVICE_START_TIMEOUT:.0f}s; see {services[-1].log_path}")
        time.sleep(0.2)
    print(f"poll endpoint: http://127.0.0.1:{http_port}/campaigns/<id> "
          f"(up after {time.monotonic() - started:.1f}s; bearer tokens: {tokens_file})", flush=True)

    # 4. publish and follow
    campaign_id = f"demo-{stamp}"
    recipients = demo_recipients(args.recipients, bounce_address(stamp))
    from services.pipeline.publish import publish_campaign

    print(f"publishing campaign {campaign_id}: {len(recipients)} recipients in chunks of "
          f"{args.chunk_size}", flush=True)
    t0 = time.monotonic()
    asyncio.run(publish_campaign(demo, demo_campaign(campaign_id), recipients, args.chunk_size))
    print(f"published in {time.monotonic() - t0:.1f}s", flush=True)
    view, wall = _follow(args, http_port, api_token, campaign_id, len(recipients), children, t0)
    return _summary(view, wall, len(recipients))


def _announced(stop: Callable[[], None], done: str) -> Callable[[], None]:
    """`stop`, then print `done` (when not empty)."""

    def run() -> None:
        stop()
        if done:
            _say(done)

    return run


def _wait_for_port(child: Child, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        child.check()
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not listen on {port}; see {child.log_path}")
        time.sleep(0.1)


def _migrate(database_url: str) -> None:
    try:
        from services.pipeline.migrations import migrate
    except ImportError as exc:
        raise DemoError(f"migrations are not available: {exc}") from None
    applied = list(migrate(database_url))
    print(f"migrations: {', '.join(applied) if applied else 'up to date'}", flush=True)


def _api_token_file(run_dir: Path) -> tuple[str, Path]:
    """A fresh `ops` token for the demo's polling and the tokens file (its hash only) the
    reconciler reads; the token stays in this process and is never printed."""
    from services.pipeline.api_tokens import new_token, token_entry

    token = new_token()
    path = (run_dir / "api_tokens.json").resolve()
    path.write_bytes(orjson.dumps({"tokens": [token_entry(token, "demo", "ops")]}))
    return token, path



def _follow(
    args: argparse.Namespace, http_port: int, api_token: str, campaign_id: str, total: int,
    children: list[Child], t0: float,
) -> tuple[dict[str, Any], float]:
    plain = bool(args.no_progress) or not sys.stdout.isatty()
    deadline = t0 + args.timeout
    view: dict[str, Any] | None = None
    with Progress(total, plain) as progress:
        while True:
            for child in children:
                child.check()
            view = fetch_campaign(http_port, api_token, campaign_id)
            elapsed = time.monotonic() - t0
            status = str(view.get("status")) if view else "waiting"
            progress.update(status, counts_of(view), elapsed)
            if view is not None and status == "completed":
                return view, elapsed
            if time.monotonic() > deadline:
                state = (f"status {status}, {counts_of(view)['pending']} pending" if view
                         else "the reconciler has not seen it yet")
                raise DemoError(
                    f"campaign {campaign_id} not completed after {args.timeout:.0f}s ({state})"
                )
            time.sleep(POLL_INTERVAL)


def _summary(view: dict[str, Any], wall: float, recipients: int) -> int:
    counts = counts_of(view)
    done = sum(counts[k] for k in TERMINAL)
    rate = done / wall if wall > 0 else 0.0
    print()
    print(f"campaign {view.get('campaign_id', '?')}: {view.get('status')}")
    print(f"  recipients  {recipients}")
    print(f"  sent        {counts['sent']}")
    print(f"  failed      {counts['failed']}")
    for email, reply in failed_recipients(view):
        print(f"    {mask_email(email)}  {reply}")
    if view.get("failed_recipients_truncated"):
        print("    (more failed recipients than the endpoint lists)")
    for key in ("skipped", "unknown", "cancelled"):
        if counts[key]:
            print(f"  {key:<11} {counts[key]}")
    print(f"  pending     {counts['pending']}")
    print(f"  wall time   {wall:.1f}s (publish to completion)")
    print(f"  throughput  {rate:.1f} messages/s", flush=True)
    ok = counts["pending"] == 0 and done == recipients and counts["total"] == recipients
    if not ok:
        print(f"demo failed: {done} of {recipients} recipients reached a terminal state",
              file=sys.stderr)
    return 0 if ok else 1
