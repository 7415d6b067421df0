"""A local Apache Kafka broker (KRaft, one node: broker + controller) on loopback.

No Docker needed: Kafka's jars come from Maven Central (``mvn`` fetches them once into a
cache) and the broker runs with ``java``. The demo and the integration tests use it;
CI pre-warms the cache with ``python -m connector.localkafka fetch``.

    with LocalKafka() as kafka:            # fresh broker, free ports, temporary state
        use(kafka.bootstrap_servers)       # "127.0.0.1:<port>"
        kafka.run_tool("org.apache.kafka.tools.GetOffsetShell",
                       "--bootstrap-server", kafka.bootstrap_servers, "--topic", "t")

Command line (the broker keeps running after ``start`` returns)::

    python -m connector.localkafka start [--state-dir .local/kafka] [--port N]
    python -m connector.localkafka status|stop [--state-dir .local/kafka]
    python -m connector.localkafka fetch

Errors are :class:`LocalKafkaError` with what to install or the tail of the broker log.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from xml.sax.saxutils import quoteattr

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
HOST = "127.0.0.1"
CACHE_ENV = "THREADS_CONNECTOR_CACHE"
DEFAULT_STATE_DIR = Path(".local/kafka")

POM_TEMPLATE = string.Template("""\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.threads-connector</groupId>
  <artifactId>kafka-local</artifactId>
  <version>$kafka_version</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>$kafka_version</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>$kafka_version</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>$log4j_version</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>$log4j_version</version>
    </dependency>
  </dependencies>
</project>
""")

LOG4J2_TEMPLATE = string.Template("""\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="ERROR">
  <Appenders>
    $appender
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="out"/></Root>$loggers
  </Loggers>
</Configuration>
""")
_PATTERN = '<PatternLayout pattern="[%d] %p %m (%c)%n"/>'

# Quick JVM start for short-lived tools (their stdout is parsed: JVM warnings go to stderr);
# the broker keeps the default JIT. Both use an AppCDS archive made on first use.
_TOOL_JVM_OPTS = (
    "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
    "-Xlog:disable", "-Xlog:all=warning:stderr",
)  # fmt: skip
_BROKER_JVM_OPTS = ("-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
CDS_ENV = "THREADS_CONNECTOR_KAFKA_CDS"  # "0" turns class-data-sharing archives off

_INSTALL_HINTS = {
    "mvn": (
        "Maven ('mvn') is not on PATH; it fetches Kafka's jars from Maven Central once. "
        "Install Maven 3.6+ (Debian/Ubuntu: apt-get install maven; macOS: brew install maven)."
    ),
    "java": (
        f"Java ('java') is not on PATH and JAVA_HOME is not set; Kafka {KAFKA_VERSION} needs a "
        "Java 17+ runtime (Debian/Ubuntu: apt-get install openjdk-17-jre-headless; "
        "macOS: brew install openjdk@17)."
    ),
}


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


# --------------------------------------------------------------------------- jars


def default_cache_dir() -> Path:
    """``$THREADS_CONNECTOR_CACHE`` or ``~/.cache/threads-connector``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "threads-connector"


def render_pom(kafka_version: str = KAFKA_VERSION, log4j_version: str = LOG4J_VERSION) -> str:
    return POM_TEMPLATE.substitute(kafka_version=kafka_version, log4j_version=log4j_version)


def find_executable(name: str) -> str:
    """Path of ``mvn`` or ``java`` (``$JAVA_HOME/bin/java`` first), or an install hint."""
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise LocalKafkaError(_INSTALL_HINTS.get(name, f"{name!r} is not on PATH"))
    return found


def _kafka_home(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()).expanduser() / f"kafka-{KAFKA_VERSION}"


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """Kafka's jars in ``<cache>/kafka-<version>/libs``, fetched with Maven on first use.

    Safe to call concurrently (across processes too): one caller fetches under a file
    lock, the others wait and reuse its result. Cheap once the marker file exists.
    """
    home = _kafka_home(cache_dir)
    libs, marker = home / "libs", home / ".complete"
    pom_text = render_pom()
    digest = hashlib.sha256(pom_text.encode()).hexdigest()

    def done() -> bool:
        return marker.is_file() and marker.read_text().strip() == digest and libs.is_dir()

    if done():
        return libs
    mvn = find_executable("mvn")
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        if done():
            return libs
        logger.info("fetching Apache Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
        pom = home / "pom.xml"
        pom.write_text(pom_text)
        staging = home / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={staging}"]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, cwd=home, capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(f"mvn did not finish within {exc.timeout:.0f}s") from exc
        if proc.returncode != 0 or not (staging / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise LocalKafkaError(
                f"mvn failed (exit {proc.returncode}) fetching Kafka {KAFKA_VERSION} jars: "
                f"{' '.join(cmd)}\n{_tail(proc.stdout + proc.stderr)}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        shutil.rmtree(home / "cds", ignore_errors=True)
        staging.rename(libs)
        marker.write_text(digest + "\n")
        logger.info("Kafka jars ready: %d files", len(list(libs.glob("*.jar"))))
    return libs


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tools_log4j(home: Path) -> Path:
    """A log4j2 config for CLI tools: warnings to stderr, stdout left to the tool."""
    path = home / "log4j2-tools.xml"
    text = LOG4J2_TEMPLATE.substitute(
        appender=f'<Console name="out" target="SYSTEM_ERR">{_PATTERN}</Console>', loggers=""
    )
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


class _ClassDataArchive:
    """An AppCDS archive of Kafka's classes: ~2x faster JVM start once it exists.

    The first JVM of a kind dumps one at exit into a private file, published with an
    atomic rename, so concurrent JVMs never see a partial archive.
    """

    def __init__(self, libs: Path, java: str, kind: str, *, create: bool = True) -> None:
        self._tmp: Path | None = None
        self.options: list[str] = []
        if os.environ.get(CDS_ENV, "1") == "0":
            return
        st = os.stat(java)
        key = hashlib.sha256(f"{os.path.realpath(java)}:{st.st_size}:{st.st_mtime_ns}".encode())
        self.archive = libs.parent / "cds" / f"{kind}-{key.hexdigest()[:12]}.jsa"
        self.options = ["-XX:+IgnoreUnrecognizedVMOptions"]
        if self.archive.is_file():
            self.options.append(f"-XX:SharedArchiveFile={self.archive}")
        elif create:
            self.archive.parent.mkdir(parents=True, exist_ok=True)
            tag = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:6]}"
            self._tmp = self.archive.with_name(f"{self.archive.name}.tmp-{tag}")
            self.options.append(f"-XX:ArchiveClassesAtExit={self._tmp}")

    def publish(self) -> None:
        """After the JVM exited: keep the archive it dumped, if any."""
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return
        if tmp.is_file() and tmp.stat().st_size > 0:
            with contextlib.suppress(OSError):
                tmp.replace(self.archive)
        tmp.unlink(missing_ok=True)


def _run_java(
    libs: Path, kind: str, args: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    java = find_executable("java")
    cds = _ClassDataArchive(libs, java, kind)
    cmd = [
        java, *_TOOL_JVM_OPTS, *cds.options,
        f"-Dlog4j2.configurationFile={_tools_log4j(libs.parent)}",
        "-cp", str(libs / "*"), *args,
    ]  # fmt: skip
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    finally:
        cds.publish()


def run_tool(
    main_class: str,
    *args: str,
    cache_dir: Path | None = None,
    timeout_s: float = 120.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a Kafka command-line tool class (e.g. ConsumerGroupCommand) on Kafka's classpath.

    ``check=True`` raises :class:`LocalKafkaError` with the output when the tool fails.
    """
    libs = ensure_jars(cache_dir)
    try:
        proc = _run_java(libs, "tools", [main_class, *args], timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise LocalKafkaError(f"{main_class} did not finish within {timeout_s:.0f}s") from exc
    if check and proc.returncode != 0:
        raise LocalKafkaError(
            f"{main_class} {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{_tail(proc.stdout + proc.stderr)}"
        )
    return proc


# --------------------------------------------------------------------------- config


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    node_id: int = 1,
    overrides: Mapping[str, str] | None = None,
) -> str:
    """server.properties for a one-node KRaft broker+controller on loopback, tuned for tests."""
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "auto.leader.rebalance.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",  # a crashed broker may re-register after this
        "log.segment.bytes": str(8 * 1024 * 1024),
        "log.cleaner.enable": "true",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.cleaner.backoff.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
    }
    props.update(overrides or {})
    return "".join(f"{k}={_escape_property(v)}\n" for k, v in props.items())


def _escape_property(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_log4j2(log_file: Path) -> str:
    """Quiet broker logging to ``log_file``: WARN and above, plus the few INFO lines that
    tell how far start-up got (registration, "Kafka Server started")."""
    appender = f'<File name="out" fileName={quoteattr(str(log_file))}>{_PATTERN}</File>'
    loggers = "".join(
        f'\n    <Logger name="{name}" level="INFO"/>'
        for name in ("kafka.server.BrokerLifecycleManager", "kafka.server.KafkaRaftServer")
    )
    return LOG4J2_TEMPLATE.substitute(appender=appender, loggers=loggers)


def random_cluster_id() -> str:
    """A Kafka cluster id (base64url UUID, as ``StorageTool random-uuid`` makes), no JVM."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail(fh.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""


# --------------------------------------------------------------------------- readiness


async def _describe_cluster(bootstrap: str, timeout_s: float) -> int:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), retry_backoff_ms=50
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            info = await admin.describe_cluster()
    finally:
        await admin.close()
    return len(info.get("brokers") or [])


async def _warm_coordinators(bootstrap: str, timeout_s: float) -> None:
    """Until the group and transaction coordinators answer (creating their internal
    topics), so the first consumer group or transactional producer of a test need not
    wait out COORDINATOR_NOT_AVAILABLE."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            for step in ("group", "offsets", "transaction"):
                while True:
                    try:
                        if step == "offsets":
                            await admin.list_consumer_group_offsets(_WARMUP_KEY)
                        else:
                            await admin.find_coordinator(_WARMUP_KEY, int(step == "transaction"))
                        break
                    except KafkaError as exc:
                        if not exc.retriable:
                            raise
                        await asyncio.sleep(0.05)
    finally:
        await admin.close()


_WARMUP_KEY = "localkafka-warmup"


def _in_private_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    with ThreadPoolExecutor(1, thread_name_prefix="localkafka-probe") as pool:
        return pool.submit(asyncio.run, coro).result()


def metadata_broker_count(bootstrap: str, timeout_s: float = 5.0) -> int:
    """Brokers listed in a Kafka metadata response from ``bootstrap``.

    Runs aiokafka on a private event loop in a worker thread, so it also works when called
    from code that is itself running inside an event loop.
    """
    return _in_private_loop(_describe_cluster(bootstrap, timeout_s))


# --------------------------------------------------------------------------- broker

_running: set[LocalKafka] = set()  # strong refs: a running broker is never forgotten


@atexit.register
def _stop_leftovers() -> None:
    for kafka in list(_running):
        with contextlib.suppress(LocalKafkaError, OSError):
            kafka.stop()


class LocalKafka:
    """One Kafka broker+controller process on 127.0.0.1 with its own ports and log dir.

    ``start()`` formats fresh storage and waits until the broker answers a metadata
    request; ``stop()`` shuts it down (SIGTERM, then SIGKILL) and deletes a temporary state
    dir. ``kill_hard()`` SIGKILLs it but keeps ports and data, so a following ``start()``
    brings the same broker back (crash tests); ``restart()`` does that gracefully.
    Both ``start`` and ``stop`` are idempotent; the object is a context manager. Brokers
    still running when the interpreter exits are stopped.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        port: int | None = None,
        cache_dir: Path | None = None,
        heap_mb: int = 512,
        start_timeout_s: float = 90.0,
        stop_timeout_s: float = 30.0,
        broker_config: Mapping[str, str] | None = None,
    ) -> None:
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self._fixed_port = port
        self._cache_dir = cache_dir
        self._heap_mb = heap_mb
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._broker_config = dict(broker_config or {})
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._state_dir: Path | None = None
        self._ports: tuple[int, int] | None = None
        self._cds: _ClassDataArchive | None = None
        self._create_cds = True  # off for detached brokers: nobody publishes their archive
        self._formatted = False  # data dir holds this instance's broker (restart keeps it)

    # ---------------------------------------------------------------- properties
    @property
    def bootstrap_servers(self) -> str:
        if self._ports is None:
            raise LocalKafkaError("the local Kafka broker is not started")
        return f"{HOST}:{self._ports[0]}"

    @property
    def port(self) -> int | None:
        return self._ports[0] if self._ports else None

    @property
    def controller_port(self) -> int | None:
        return self._ports[1] if self._ports else None

    @property
    def state_dir(self) -> Path | None:
        return self._state_dir

    @property
    def log_file(self) -> Path | None:
        return self._state_dir / "kafka.log" if self._state_dir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> str:
        """Start the broker (no-op if running) and return its bootstrap address."""
        with self._lock:
            if self.running:
                return self.bootstrap_servers
            self._reap()
            began = time.monotonic()
            libs = ensure_jars(self._cache_dir)
            java = find_executable("java")
            state = self._ensure_state_dir()
            attempts = 1 if (self._formatted or self._fixed_port) else 3
            for attempt in range(1, attempts + 1):
                fresh = not self._formatted
                if fresh:
                    self._prepare(libs, state)
                self._launch(java, libs, state)
                try:
                    self._wait_ready()
                    break
                except LocalKafkaError:
                    self._formatted = self._formatted and not fresh
                    raise
                except _PortTaken:
                    self._halt(signal.SIGKILL)
                    self._formatted = False
                    if attempt == attempts:
                        raise LocalKafkaError(
                            f"port in use: {self.bootstrap_servers}\n{self._log_tail()}"
                        ) from None
                    logger.info("a chosen port was taken meanwhile; retrying with new ports")
            (state / "kafka.pid").write_text(f"{self.pid}\n")
            (state / "bootstrap").write_text(self.bootstrap_servers + "\n")
            _running.add(self)
            logger.info(
                "local Kafka %s ready at %s in %.1fs (state %s)",
                KAFKA_VERSION, self.bootstrap_servers, time.monotonic() - began, state,
            )  # fmt: skip
            return self.bootstrap_servers

    def stop(self) -> None:
        """Stop the broker: SIGTERM, wait, SIGKILL. Deletes a temporary state dir."""
        with self._lock:
            self._halt(signal.SIGTERM)
            self._formatted = False
            self._ports = None
            state, self._state_dir = self._state_dir, None
            if state is not None:
                if self._given_state_dir is None:
                    shutil.rmtree(state, ignore_errors=True)
                else:
                    for name in ("kafka.pid", "bootstrap"):
                        (state / name).unlink(missing_ok=True)

    def kill_hard(self) -> None:
        """SIGKILL the broker (a crash); ports and data stay, so ``start()`` recovers it."""
        with self._lock:
            self._halt(signal.SIGKILL)

    def restart(self) -> str:
        """Graceful stop and start of the same broker: same address, same data."""
        with self._lock:
            self._halt(signal.SIGTERM)
            return self.start()

    def detach(self) -> None:
        """Leave the broker running after this process exits (the CLI's ``start``)."""
        with self._lock:
            _running.discard(self)
            if self._out is not None:
                self._out.close()
                self._out = None
            self._proc = None

    def run_tool(
        self, main_class: str, *args: str, timeout_s: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """:func:`run_tool` with this broker's jar cache."""
        return run_tool(
            main_class, *args, cache_dir=self._cache_dir, timeout_s=timeout_s, check=check
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.bootstrap_servers if self._ports else "not started"
        return f"<LocalKafka {KAFKA_VERSION} {where} running={self.running}>"

    # ---------------------------------------------------------------- internals
    def _ensure_state_dir(self) -> Path:
        if self._state_dir is None:
            if self._given_state_dir is not None:
                state = self._given_state_dir.expanduser().resolve()
                if _read_pid(state) is not None:
                    raise LocalKafkaError(
                        f"a Kafka broker already runs from {state}; stop it first "
                        f"(python -m connector.localkafka stop --state-dir {state})"
                    )
                state.mkdir(parents=True, exist_ok=True)
                self._state_dir = state
            else:
                self._state_dir = Path(tempfile.mkdtemp(prefix="localkafka-"))
        return self._state_dir

    def _prepare(self, libs: Path, state: Path) -> None:
        """Choose ports, write the config files and format a fresh log dir."""
        data = state / "data"
        shutil.rmtree(data, ignore_errors=True)
        if self._fixed_port is not None:
            if not _port_free(self._fixed_port):
                raise LocalKafkaError(f"port in use: {HOST}:{self._fixed_port}")
            self._ports = (self._fixed_port, _free_ports(1)[0])
        else:
            first, second = _free_ports(2)
            self._ports = (first, second)
        port, controller_port = self._ports
        (state / "server.properties").write_text(
            render_server_properties(
                port=port,
                controller_port=controller_port,
                log_dir=data,
                overrides=self._broker_config,
            )
        )
        (state / "log4j2.xml").write_text(render_log4j2(state / "kafka.log"))
        args = ["kafka.tools.StorageTool", "format", "--standalone",
                "-t", random_cluster_id(), "-c", str(state / "server.properties")]  # fmt: skip
        proc = _run_java(libs, "tools", args, timeout_s=120)
        if proc.returncode != 0:
            raise LocalKafkaError(
                f"formatting Kafka storage failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
        self._formatted = True

    def _launch(self, java: str, libs: Path, state: Path) -> None:
        out_path = state / "kafka.out"
        self._out = out_path.open("ab")
        self._cds = _ClassDataArchive(libs, java, "broker", create=self._create_cds)
        cmd = [
            java, f"-Xmx{self._heap_mb}m", "-Xms64m", *_BROKER_JVM_OPTS, *self._cds.options,
            f"-Dlog4j2.configurationFile={state / 'log4j2.xml'}",
            "-cp", str(libs / "*"),
            "kafka.Kafka", str(state / "server.properties"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd,
            cwd=state,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        if self._proc is None or self._ports is None:
            raise LocalKafkaError("the broker process was not launched")
        deadline = time.monotonic() + self._start_timeout_s
        last_error = "the broker port never accepted a connection"
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self._log_tail()
                if "BindException" in tail or "Address already in use" in tail:
                    raise _PortTaken
                self._halt(signal.SIGKILL)
                raise LocalKafkaError(f"the Kafka broker exited with code {code}\n{tail}")
            if _port_open(self._ports[0]):
                try:
                    if metadata_broker_count(self.bootstrap_servers, timeout_s=3.0) > 0:
                        remaining_s = max(deadline - time.monotonic(), 5.0)
                        _in_private_loop(_warm_coordinators(self.bootstrap_servers, remaining_s))
                        return
                    last_error = "the metadata response listed no broker yet"
                except (KafkaError, OSError, TimeoutError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self._halt(signal.SIGKILL)
                raise LocalKafkaError(
                    f"the Kafka broker at {self.bootstrap_servers} did not answer a metadata "
                    f"request within {self._start_timeout_s:g}s ({last_error})\n{tail}"
                )
            time.sleep(0.1)

    def _halt(self, sig: signal.Signals) -> None:
        """End the process (``sig`` first, SIGKILL if it lingers) and release handles."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, sig)
            try:
                proc.wait(self._stop_timeout_s if sig != signal.SIGKILL else 10)
            except subprocess.TimeoutExpired:
                logger.warning("Kafka broker pid %d ignored %s; killing it", proc.pid, sig.name)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        if self._cds is not None and (self._proc is None or self._proc.poll() is not None):
            self._cds.publish()
            self._cds = None
        self._proc = None
        _running.discard(self)
        if self._out is not None:
            self._out.close()
            self._out = None

    def _log_tail(self) -> str:
        if self._state_dir is None:
            return ""
        parts = []
        for name in ("kafka.out", "kafka.log"):
            tail = _tail_file(self._state_dir / name)
            if tail:
                parts.append(f"--- tail of {self._state_dir / name} ---\n{tail}")
        return "\n".join(parts) or f"(no output yet in {self._state_dir}/kafka.out, kafka.log)"


class _PortTaken(Exception):
    pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --------------------------------------------------------------------------- CLI


def _read_pid(state: Path) -> int | None:
    """The pid in ``state/kafka.pid`` if that process is still this state dir's broker."""
    try:
        pid = int((state / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        args = subprocess.run(
            ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None
    props = str(state.resolve() / "server.properties")
    return pid if "kafka.Kafka" in args and props in args else None


def _cli_stop(state: Path, timeout_s: float = 30.0) -> bool:
    pid = _read_pid(state)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _read_pid(state) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if _read_pid(state) == pid:
        _signal_group(pid, signal.SIGKILL)
    for name in ("kafka.pid", "bootstrap"):
        (state / name).unlink(missing_ok=True)
    return True


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connector.localkafka",
        description=f"A local Apache Kafka {KAFKA_VERSION} broker (KRaft, one node) on loopback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("start", "start a broker in the background; prints its bootstrap address"),
        ("stop", "stop the broker of a state dir"),
        ("status", "print the bootstrap address if running (exit 1 if not)"),
        ("fetch", "only download Kafka's jars into the cache (CI pre-warming)"),
    ]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache-dir", type=Path, default=None, help="jar cache root")
        if name != "fetch":
            cmd.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        if name == "start":
            cmd.add_argument("--port", type=int, default=None, help="client port (default: free)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "fetch":
            _out(str(ensure_jars(args.cache_dir)))
            return 0
        state: Path = args.state_dir.expanduser().resolve()
        bootstrap_file = state / "bootstrap"
        if args.command == "status":
            if _read_pid(state) is None or not bootstrap_file.is_file():
                _out("not running")
                return 1
            bootstrap = bootstrap_file.read_text().strip()
            brokers = metadata_broker_count(bootstrap)
            _out(f"running {bootstrap} (pid {_read_pid(state)}, {brokers} broker)")
            return 0
        if args.command == "stop":
            _out("stopped" if _cli_stop(state) else "not running")
            return 0
        if _read_pid(state) is not None and bootstrap_file.is_file():
            _out(bootstrap_file.read_text().strip())
            return 0
        kafka = LocalKafka(state, port=args.port, cache_dir=args.cache_dir)
        kafka._create_cds = False
        bootstrap = kafka.start()
        kafka.detach()
        _out(bootstrap)
        return 0
    except (LocalKafkaError, KafkaError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
