"""Apache Kafka on loopback, from the jars `make kafka` resolves from Maven Central.

Contract: `start_kafka(run_dir, nodes=N)` formats KRaft storage for N combined
broker+controller nodes under `run_dir`, starts them on free loopback ports and
returns a `KafkaCluster` once every node serves as a broker (an AdminClient
sees all N); `stop()` sends SIGTERM (Kafka's controlled shutdown) and SIGKILLs
what is left after a grace period. `kill(node_id)` and `restart(node_id)` act
on one node and keep its data, for fault tests. `sasl_ssl=SecureListener(...)`
adds a SASL_SSL listener (SCRAM users, PEM key store, optional client
certificates) beside the PLAINTEXT one the nodes use among themselves;
`advertised_ports=` sends clients through a proxy (a network cut in a test). Every
node logs to files in its folder, never to the terminal. `kafka_tool()` runs
one of Kafka's own command-line tools from the same jars.
`python -m services.pipeline.kafka_local --port 9092` runs a one-node broker in
the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.pipeline.embedded import free_port, log_tail, port_open, stop_processes

#: The Apache Kafka version of deploy/kafka/pom.xml and docker-compose.yml's image.
KAFKA_VERSION = "3.9.0"
ROOT = Path(__file__).resolve().parents[2]
#: Where `make kafka` copies the broker's jars; MAILER_KAFKA_LIBS overrides it.
DEFAULT_LIBS = ROOT / "deploy" / "kafka" / "target" / "libs"
BROKER_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
CONSUMER_GROUP_COMMAND = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
JVM_OPTIONS = ("-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", "-XX:TieredStopAtLevel=1")
SECURE_LISTENER = "SECURE"


class KafkaLocalError(RuntimeError):
    """The local Kafka could not be found, formatted or started."""


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener: SCRAM users and a PEM key store (private key and certificate
    chain in one file); with `client_ca_file`, clients must present a certificate it signed."""

    keystore_pem: Path
    users: dict[str, str]
    mechanism: str = "SCRAM-SHA-512"
    client_ca_file: Path | None = None


@dataclass
class KafkaNode:
    """One combined broker+controller process and its folder."""

    node_id: int
    port: int
    controller_port: int
    secure_port: int | None
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Where clients are told to connect instead of `port` (a proxy in front); the nodes
    #: then talk among themselves on an INTERNAL listener at `internal_port`.
    advertised_port: int | None = None
    internal_port: int | None = None

    @property
    def log_path(self) -> Path:
        """The node's server log (log4j)."""
        return self.folder / "logs" / "server.log"

    @property
    def alive(self) -> bool:
        """Whether the node's process runs."""
        return self.proc is not None and self.proc.poll() is None


@dataclass
class KafkaCluster:
    """Running local Kafka nodes."""

    nodes: list[KafkaNode]
    run_dir: Path
    cluster_id: str
    libs: Path
    secure: SecureListener | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        """The PLAINTEXT bootstrap servers of every node."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def secure_bootstrap_servers(self) -> str:
        """The SASL_SSL bootstrap servers (only with `sasl_ssl=`)."""
        if self.secure is None:
            raise KafkaLocalError("this cluster has no SASL_SSL listener")
        return ",".join(f"localhost:{n.secure_port}" for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        """The node with `node_id`."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash: no controlled shutdown); its data stays."""
        node = self.node(node_id)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        """Start a stopped or killed node again on its ports and data; return once it serves."""
        node = self.node(node_id)
        if node.alive:
            raise KafkaLocalError(f"node {node_id} is running")
        node.proc = _launch(node, self.libs)
        _wait_serving(self, [node], timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node: SIGTERM, then SIGKILL after `timeout` s. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        stop_processes([n.proc for n in self.nodes if n.proc is not None], timeout)

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- finding Java and the jars ---------------------------------------------------


def libs_dir() -> Path:
    """The folder of the broker's jars; KafkaLocalError saying how to get them when missing."""
    libs = Path(os.environ.get("MAILER_KAFKA_LIBS") or DEFAULT_LIBS)
    if not any(libs.glob(f"*kafka_2.13-{KAFKA_VERSION}.jar")):
        raise KafkaLocalError(
            f"Apache Kafka {KAFKA_VERSION} jars not found in {libs}: run `make kafka` "
            "(Maven resolves them from Maven Central)"
        )
    return libs


def java_binary() -> str:
    """The `java` to run Kafka with (JAVA_HOME first, then PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise KafkaLocalError("java not found: Apache Kafka needs Java 17 (set JAVA_HOME or PATH)")
    return found


def _java_command(libs: Path, main_class: str, *args: str, log4j: Path | None = None) -> list[str]:
    command = [java_binary(), *JVM_OPTIONS]
    if log4j is not None:
        command.append(f"-Dlog4j.configuration=file:{log4j}")
    return [*command, "-cp", f"{libs}/*", main_class, *args]


def kafka_tool(main_class: str, *args: str, timeout: float = 120.0) -> str:
    """Run one of Kafka's command-line tools (e.g. CONSUMER_GROUP_COMMAND) from the same
    jars; return what it printed on stdout. KafkaLocalError with its stderr when it fails."""
    libs = libs_dir()
    quiet = Path(tempfile.gettempdir()) / "mailer-kafka-tool-log4j.properties"
    quiet.write_text("log4j.rootLogger=WARN, stderr\n"
                     "log4j.appender.stderr=org.apache.log4j.ConsoleAppender\n"
                     "log4j.appender.stderr.Target=System.err\n"
                     "log4j.appender.stderr.layout=org.apache.log4j.PatternLayout\n"
                     "log4j.appender.stderr.layout.ConversionPattern=%p %m%n\n")
    done = subprocess.run(_java_command(libs, main_class, *args, log4j=quiet),
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise KafkaLocalError(f"{main_class} exited with {done.returncode}: "
                              f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode()


# --- configuration ---------------------------------------------------------------


def new_cluster_id() -> str:
    """A random KRaft cluster id (a Kafka Uuid: 16 bytes, URL-safe base64 without padding),
    never starting with "-": kafka-storage would read it as an option (one id in 64 did, and
    failed a CI run); Kafka's own `Uuid.randomUuid` draws again for the same reason."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _log4j_properties(logs: Path) -> str:
    return (
        "log4j.rootLogger=INFO, server\n"
        "log4j.appender.server=org.apache.log4j.RollingFileAppender\n"
        f"log4j.appender.server.File={logs}/server.log\n"
        "log4j.appender.server.MaxFileSize=20MB\n"
        "log4j.appender.server.MaxBackupIndex=2\n"
        "log4j.appender.server.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.server.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        "log4j.logger.kafka.request.logger=WARN\n"
        "log4j.logger.kafka.log.LogCleaner=WARN\n"
        "log4j.logger.state.change.logger=WARN\n"
    )


def server_properties(node: KafkaNode, voters: str, size: int,
                      secure: SecureListener | None = None,
                      extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server.properties of one combined node of a `size`-node cluster."""
    listeners = [f"PLAINTEXT://127.0.0.1:{node.port}", f"CONTROLLER://127.0.0.1:{node.controller_port}"]
    advertised = [f"PLAINTEXT://127.0.0.1:{node.advertised_port or node.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    inter_broker = "PLAINTEXT"
    if node.internal_port is not None:
        listeners.append(f"INTERNAL://127.0.0.1:{node.internal_port}")
        advertised.append(f"INTERNAL://127.0.0.1:{node.internal_port}")
        protocols.append("INTERNAL:PLAINTEXT")
        inter_broker = "INTERNAL"
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": inter_broker,
        "log.dirs": str(node.folder / "data"),
        "num.partitions": "1",
        "default.replication.factor": str(min(3, size)),
        "offsets.topic.replication.factor": str(min(3, size)),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(min(3, size)),
        "transaction.state.log.min.isr": str(min(2, size)),
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        "auto.create.topics.enable": "false",
        "unclean.leader.election.enable": "false",
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    if secure is not None:
        listeners.append(f"{SECURE_LISTENER}://localhost:{node.secure_port}")
        advertised.append(f"{SECURE_LISTENER}://localhost:{node.secure_port}")
        protocols.append(f"{SECURE_LISTENER}:SASL_SSL")
        name = SECURE_LISTENER.lower()
        mech = secure.mechanism.lower()
        props.update({
            "sasl.enabled.mechanisms": secure.mechanism,
            f"listener.name.{name}.sasl.enabled.mechanisms": secure.mechanism,
            f"listener.name.{name}.{mech}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            f"listener.name.{name}.ssl.keystore.type": "PEM",
            f"listener.name.{name}.ssl.keystore.location": str(secure.keystore_pem),
            f"listener.name.{name}.ssl.client.auth": "required" if secure.client_ca_file else "none",
        })
        if secure.client_ca_file is not None:
            props[f"listener.name.{name}.ssl.truststore.type"] = "PEM"
            props[f"listener.name.{name}.ssl.truststore.location"] = str(secure.client_ca_file)
    props["listeners"] = ",".join(listeners)
    props["advertised.listeners"] = ",".join(advertised)
    props["listener.security.protocol.map"] = ",".join(protocols)
    props.update(extra or {})
    return props


def _write_properties(path: Path, props: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")


# --- starting and waiting --------------------------------------------------------


def _format(node: KafkaNode, libs: Path, cluster_id: str, secure: SecureListener | None) -> None:
    args = ["format", f"--cluster-id={cluster_id}", "-c", str(node.folder / "server.properties")]
    if secure is not None:
        for user, password in secure.users.items():
            args += ["--add-scram", f"{secure.mechanism}=[name={user},password={password}]"]
    done = subprocess.run(
        _java_command(libs, STORAGE_TOOL_CLASS, *args, log4j=node.folder / "log4j.properties"),
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    if done.returncode != 0:
        # the tool echoes its arguments on errors: never show SCRAM passwords
        text = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        for password in (secure.users.values() if secure else ()):
            text = text.replace(password, "***")
        raise KafkaLocalError(f"formatting node {node.node_id} failed: {text[-2000:]}")


def _launch(node: KafkaNode, libs: Path) -> subprocess.Popen[bytes]:
    out = (node.folder / "logs" / "stdout.log").open("ab")
    with out:
        return subprocess.Popen(
            _java_command(libs, BROKER_CLASS, str(node.folder / "server.properties"),
                          log4j=node.folder / "log4j.properties"),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "LOG_DIR": str(node.folder / "logs")},
        )


def _wait_serving(cluster: KafkaCluster, waiting: list[KafkaNode], timeout: float) -> None:
    """Return once every node in `waiting` is a live broker in the cluster's metadata."""
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    for node in waiting:
        while not port_open("127.0.0.1", node.port):
            _check_alive(node)
            if time.monotonic() > deadline:
                raise KafkaLocalError(f"node {node.node_id} did not listen within {timeout:.0f}s:\n"
                                      + log_tail(node.log_path))
            time.sleep(0.2)
    wanted = {n.node_id for n in waiting}
    for node in waiting:
        # log_level 0: no librdkafka lines about a node that is still starting
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{node.port}", "log_level": 0})
        while True:
            _check_alive(node)
            with contextlib.suppress(Exception):
                brokers = set(admin.list_topics(timeout=2).brokers)
                if wanted <= brokers:
                    break
            if time.monotonic() > deadline:
                raise KafkaLocalError(f"node {node.node_id} did not serve within {timeout:.0f}s:\n"
                                      + log_tail(node.log_path))
            time.sleep(0.2)


def _check_alive(node: KafkaNode) -> None:
    if node.proc is not None and node.proc.poll() is not None:
        stdout = log_tail(node.folder / "logs" / "stdout.log")
        raise KafkaLocalError(f"node {node.node_id} exited with {node.proc.returncode}:\n"
                              f"{log_tail(node.log_path)}\n{stdout}")


def start_kafka(run_dir: Path | None = None, *, nodes: int = 1, sasl_ssl: SecureListener | None = None,
                ports: Sequence[int] | None = None, advertised_ports: Sequence[int] | None = None,
                extra: dict[str, str] | None = None, timeout: float = 120.0) -> KafkaCluster:
    """Format and start `nodes` combined KRaft nodes on loopback; return once all serve.
    `advertised_ports`: clients are told to connect there (a proxy forwarding to `ports`,
    which must then be given too, and must already listen)."""
    if advertised_ports is not None and (ports is None or len(advertised_ports) != nodes):
        raise KafkaLocalError("advertised_ports needs ports, one of each per node")
    libs = libs_dir()
    run_dir = Path(tempfile.mkdtemp(prefix="mailer-kafka-")) if run_dir is None else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for i in range(nodes):
        folder = run_dir / f"node-{i + 1}"
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        members.append(KafkaNode(
            node_id=i + 1,
            port=ports[i] if ports else free_port(),
            controller_port=free_port(),
            secure_port=free_port() if sasl_ssl is not None else None,
            folder=folder,
            advertised_port=advertised_ports[i] if advertised_ports else None,
            internal_port=free_port() if advertised_ports else None,
        ))
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in members)
    cluster = KafkaCluster(nodes=members, run_dir=run_dir, cluster_id=new_cluster_id(),
                           libs=libs, secure=sasl_ssl)
    for node in members:
        _write_properties(node.folder / "server.properties",
                          server_properties(node, voters, nodes, sasl_ssl, extra))
        (node.folder / "log4j.properties").write_text(_log4j_properties(node.folder / "logs"))
        _format(node, libs, cluster.cluster_id, sasl_ssl)
    try:
        for node in members:
            node.proc = _launch(node, libs)
        _wait_serving(cluster, members, timeout)
    except BaseException:
        cluster.stop(timeout=5)
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    """Run a local Apache Kafka in the foreground until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m services.pipeline.kafka_local",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9092, help="first node's client port (default 9092)")
    parser.add_argument("--nodes", type=int, default=1, help="combined broker+controller nodes (default 1)")
    parser.add_argument("--dir", type=Path, default=ROOT / ".kafka",
                        help="data and logs (default .kafka/; wiped at start)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if port_open("127.0.0.1", args.port):
        parser.error(f"port {args.port} is taken: is a broker already running there?")
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        cluster = start_kafka(args.dir, nodes=args.nodes,
                              ports=[args.port + i for i in range(args.nodes)])
    except KafkaLocalError as exc:
        print(f"kafka_local: {exc}", file=sys.stderr)
        return 1
    print(f"Apache Kafka {KAFKA_VERSION}: KAFKA_BOOTSTRAP_SERVERS={cluster.bootstrap_servers} "
          f"(logs in {args.dir}); Ctrl-C stops it", flush=True)
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop["now"] and all(n.alive for n in cluster.nodes):
            time.sleep(0.5)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
