"""The Grafana dashboards read real series: every panel query returns data (R25, R34).

A real Prometheus (the Debian binary `make tools` installs) runs with
deploy/prometheus/prometheus.yml, its targets pointed at this test's services
and a 1 s scrape interval, plus deploy/prometheus/alerts.yml when it exists.
A short campaign runs with one rejected address (a failure), its sends spread
over several scrapes, the senders cut off from Redis at first (Redis errors,
limiter_unavailable deferrals), a quota endpoint that fails its first poll
(quota sync error, then a quota) and one malformed command (a dead letter).
Then each panel's PromQL, with Grafana's variables filled in, must return at
least one series with a number.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from services.pipeline.embedded import free_port
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import produce_raw
from tests.support.poll import wait_for_status
from tests.support.processes import ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# what Grafana would put in for its built-in variables on a dashboard a few minutes wide
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
                     "__interval_ms": "15000", "__range_s": "3600"}
COMPOSE_PORT = 9100  # MAILER_METRICS_PORT in docker-compose.yml


# --- the dashboard files -----------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves are not yielded."""
    for item in items:
        if item.get("type") == "row":
            yield from panels(item.get("panels") or [])
        else:
            yield item


def expressions() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with Grafana variables filled in) of every target."""
    found = []
    for path in DASHBOARDS:
        board = load(path)
        for panel in panels(board["panels"]):
            for target in panel.get("targets") or []:
                found.append((board["title"], panel["title"], fill(target["expr"])))
    return found


def fill(expr: str) -> str:
    """`expr` with `$var`, `${var}` and `[[var]]` of GRAFANA_VARIABLES substituted."""
    def sub(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", sub, expr)


def provisioned_datasource() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = [s for s in doc["datasources"] if s["type"] == "prometheus"]
    return dict(source)


def test_dashboards_use_the_provisioned_prometheus() -> None:
    """Each dashboard has a unique uid and a title; every panel and target names the
    provisioned Prometheus by uid; the dashboards provider reads where compose mounts them."""
    assert len(DASHBOARDS) >= 2
    uid = provisioned_datasource()["uid"]
    uids = set()
    for path in DASHBOARDS:
        board = load(path)
        assert board.get("uid") and board.get("title"), path
        assert board["uid"] not in uids, f"{path}: duplicate uid"
        uids.add(board["uid"])
        assert board.get("schemaVersion", 0) >= 36, path
        for panel in panels(board["panels"]):
            where = f"{path.name}: {panel.get('title')!r}"
            assert panel.get("datasource") == {"type": "prometheus", "uid": uid}, where
            assert panel.get("targets"), f"{where} has no query"
            for target in panel["targets"]:
                assert target.get("expr"), where
                assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mailer.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert provisioned_datasource()["url"] == "http://prometheus:9090"


# --- a real Prometheus ---------------------------------------------------------------


def prometheus_binary() -> str:
    """The prometheus executable; fails (never skips) when it is missing."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.fail("prometheus is not installed: run `make tools` (Debian package prometheus)")
    return binary


class Prometheus:
    """A Prometheus process on a free loopback port with a config of the test's."""

    def __init__(self, binary: str, config: dict[str, Any], run_dir: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = run_dir / "prometheus.log"
        config_file = run_dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config_file}", f"--storage.tsdb.path={run_dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """GET an API path; its JSON answer (errors included)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            answer = json.loads(err.read())
        return answer

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"Prometheus not ready in {timeout}s:\n{self.logs()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_config(ports: dict[str, int], prometheus_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its compose targets (`host:9100`) pointed at
    `ports[host]` on loopback, 1 s intervals, and alerts.yml only when it exists."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert config.get("rule_files") == ["alerts.yml"]
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s",
                        "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)] if ALERTS.exists() else []
    hosts = {f"{name}:{COMPOSE_PORT}": f"127.0.0.1:{port}" for name, port in ports.items()}
    hosts["localhost:9090"] = f"127.0.0.1:{prometheus_port}"
    jobs = set()
    for job in config["scrape_configs"]:
        jobs.add(job["job_name"])
        for static in job["static_configs"]:
            unknown = [t for t in static["targets"] if t not in hosts]
            assert not unknown, f"job {job['job_name']}: targets {unknown} are no compose service"
            static["targets"] = [hosts[t] for t in static["targets"]]
    assert {"planner", "sender", "reconciler"} <= jobs
    return config


class QuotaEndpoint:
    """An smtp.bz-style quota endpoint whose first answer is a 503, then a large quota."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/user"
        self.polls = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.polls += 1
                ok = endpoint.polls > 1
                body = json.dumps({"quota": 100000, "hlimit": 1000, "hsent": 0}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if ok else b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return ""


def wait(what: str, check: Callable[[], bool], runners: list[ServiceRunner], prometheus: Prometheus,
         timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for runner in runners:
            runner.check_alive()
        prometheus.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n"
                                 + "\n".join(r.logs() for r in runners))
        time.sleep(0.2)


def has_number(answer: dict[str, Any]) -> bool:
    """Whether an instant query answered at least one series whose value is a number."""
    if answer.get("status") != "success":
        return False
    result = answer["data"]["result"]
    values = result if answer["data"]["resultType"] == "vector" else []
    return any(not math.isnan(float(series["value"][1])) for series in values)


# --- the test ----------------------------------------------------------------------


def test_every_panel_query_returns_data(
    settings: Settings, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    binary = prometheus_binary()
    redis = urlsplit(settings.redis_url)
    assert redis.hostname in ("127.0.0.1", "localhost"), "the Redis proxy forwards to loopback only"
    proxy = TcpProxy(redis.port or 6379)
    proxy.start()
    quota = QuotaEndpoint()
    # one send at a time per sender, 0.2 s each: the sends span several scrapes, so rate()
    # sees counters grow (a series first scraped at its final value has a rate of 0)
    settings = replace(settings, quota_url=quota.url, quota_sync_interval=0.5,
                       limiter_retry_seconds=1.0, sender_concurrency=1)
    smtp_server.handler.data_delay = 0.2
    netloc = redis.netloc.rsplit("@", 1)
    auth = netloc[0] + "@" if len(netloc) == 2 else ""
    cut_off = replace(settings, redis_url=urlunsplit(
        redis._replace(netloc=f"{auth}127.0.0.1:{proxy.port}")))
    ports = {name: free_port() for name in ("planner", "sender-1", "sender-2", "reconciler")}
    prometheus_port = free_port()
    (tmp_path / "prometheus").mkdir()
    started = time.monotonic()
    prometheus = Prometheus(binary, scrape_config(ports, prometheus_port), tmp_path / "prometheus",
                            prometheus_port)
    try:
        prometheus.wait_ready()
        with run_services(settings, tmp_path / "logs") as services, \
                run_services(cut_off, tmp_path / "sender-logs") as senders:
            runners = [services, senders]
            services.start("planner", "--metrics-port", str(ports["planner"]))
            services.start("reconciler", "--metrics-port", str(ports["reconciler"]))
            for name in ("sender-1", "sender-2"):
                senders.start("sender", "--metrics-port", str(ports[name]))
            proxy.cut()  # the senders' limiter finds Redis unreachable: fail_closed defers
            produce_raw(settings.kafka_bootstrap_servers,
                        topic_name(Topic.CAMPAIGN_COMMANDS, settings), [(b"broken", b"{not json")])
            people = recipients(30, domain="dash.example.com")
            smtp_server.reject(people[0]["email"])
            asyncio.run(publish_campaign(settings, campaign("dashboards"), people))
            wait("the senders to miss Redis",
                 lambda: any("mailer_redis_errors_total{" in metrics(ports[n])
                             for n in ("sender-1", "sender-2")), runners, prometheus)
            proxy.restore()
            wait_for_status(settings, services, "dashboards", "completed", timeout=90)
            senders.check_alive()
            wait("every target up", lambda: all(
                t["health"] == "up"
                for t in prometheus.get("/api/v1/targets")["data"]["activeTargets"]),
                runners, prometheus, timeout=30)
            print(f"\ncampaign completed {time.monotonic() - started:.1f}s after start")

            todo = expressions()
            answers: dict[str, dict[str, Any]] = {}

            def all_answered() -> bool:
                for _, _, expr in todo:
                    if expr not in answers or not has_number(answers[expr]):
                        answers[expr] = prometheus.get("/api/v1/query", query=expr)
                return all(has_number(answers[e]) for _, _, e in todo)

            deadline = time.monotonic() + 60
            while not all_answered() and time.monotonic() < deadline:
                prometheus.check_alive()
                time.sleep(1)
            empty = [f"{board} / {panel}: {expr}\n  -> {json.dumps(answers[expr])[:600]}"
                     for board, panel, expr in todo if not has_number(answers[expr])]
            assert not empty, "panels without data:\n" + "\n".join(empty)
            print(f"{len(todo)} panel queries answered {time.monotonic() - started:.1f}s after start")
            for board, panel, expr in todo:
                series = answers[expr]["data"]["result"]
                shown = next(s for s in series if not math.isnan(float(s["value"][1])))
                print(f"  {board} / {panel}: {len(series)} series, e.g. "
                      f"{shown['metric']} = {float(shown['value'][1]):.4g}")

            if ALERTS.exists():
                rules = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"]
                         for r in g["rules"]]
                assert rules, "alerts.yml loaded no rules"
                broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
                assert not broken, f"alert rules failing to evaluate: {broken}"
                print(f"{len(rules)} alert rules of alerts.yml loaded and evaluating")
                check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
                                       capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr
    finally:
        prometheus.stop()
        quota.stop()
        proxy.stop()
