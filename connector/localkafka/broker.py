"""The :class:`LocalKafka` broker: ports, state dir, launch, readiness, stop and restart."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiokafka.errors import KafkaError

from connector.localkafka.common import (
    HOST,
    KAFKA_VERSION,
    LocalKafkaError,
    _tail,
    _tail_file,
    logger,
)
from connector.localkafka.jars import ensure_jars, find_executable
from connector.localkafka.ports import _port_free, _port_open, _PortTaken, free_ports
from connector.localkafka.process import _read_pid, _signal_group
from connector.localkafka.properties import (
    random_cluster_id,
    render_log4j2,
    render_server_properties,
)
from connector.localkafka.readiness import (
    _in_private_loop,
    _warm_coordinators,
    metadata_broker_count,
)
from connector.localkafka.tools import _BROKER_JVM_OPTS, _ClassDataArchive, _run_java, run_tool

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
        listeners: Mapping[str, str] | None = None,
        scram_users: Mapping[str, str] | None = None,
        scram_mechanism: str = "SCRAM-SHA-512",
    ) -> None:
        """``listeners``: extra listeners, name -> security protocol (``{"SECURE":
        "SASL_SSL", "MTLS": "SSL"}``), each on a port of its own (``listener_address``);
        their TLS/SASL settings go in ``broker_config``. ``scram_users``: name -> password,
        written into the storage at format time (KRaft's ``--add-scram``). The PLAINTEXT
        listener stays for readiness probes and inter-broker traffic."""
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self._fixed_port = port
        self._cache_dir = cache_dir
        self._heap_mb = heap_mb
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._broker_config = dict(broker_config or {})
        self._listeners = dict(listeners or {})
        self._scram_users = dict(scram_users or {})
        self._scram_mechanism = scram_mechanism
        self._listener_ports: dict[str, int] = {}
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

    def listener_address(self, name: str) -> str:
        """``host:port`` of an extra listener given to the constructor."""
        if self._ports is None or name not in self._listener_ports:
            raise LocalKafkaError(f"no started listener {name!r}")
        return f"{HOST}:{self._listener_ports[name]}"

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
            if not self._formatted:
                self._adopt(state)
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

    def _adopt(self, state: Path) -> None:
        """Reuse a state dir whose storage is formatted already (a broker stopped before):
        same cluster, same ports, same data. Formatting anew would wipe every topic."""
        props = state / "server.properties"
        if not (state / "data" / "meta.properties").is_file() or not props.is_file():
            return
        ports = _listener_ports(props.read_text())
        if ports is None:
            return
        port, controller_port = ports
        if self._fixed_port is not None:
            port = self._fixed_port  # the client listener may move; the controller may not
        for taken in (p for p in (port, controller_port) if not _port_free(p)):
            raise LocalKafkaError(
                f"port {HOST}:{taken} of the broker formatted in {state} is in use; free it, "
                "or delete the state dir to start a new broker"
            )
        self._ports = (port, controller_port)
        props.write_text(
            render_server_properties(
                port=port,
                controller_port=controller_port,
                log_dir=state / "data",
                overrides=self._broker_config,
            )
        )
        (state / "log4j2.xml").write_text(render_log4j2(state / "kafka.log"))
        self._formatted = True
        logger.info("reusing the Kafka storage formatted in %s", state)

    def _prepare(self, libs: Path, state: Path) -> None:
        """Choose ports, write the config files and format a fresh log dir."""
        data = state / "data"
        shutil.rmtree(data, ignore_errors=True)
        extra = len(self._listeners)
        if self._fixed_port is not None:
            if not _port_free(self._fixed_port):
                raise LocalKafkaError(f"port in use: {HOST}:{self._fixed_port}")
            ports = [self._fixed_port, *free_ports(1 + extra)]
        else:
            ports = free_ports(2 + extra)
        self._ports = (ports[0], ports[1])
        self._listener_ports = dict(zip(self._listeners, ports[2:], strict=True))
        port, controller_port = self._ports
        (state / "server.properties").write_text(
            render_server_properties(
                port=port,
                controller_port=controller_port,
                log_dir=data,
                overrides=self._broker_config,
                listeners={
                    name: (protocol, self._listener_ports[name])
                    for name, protocol in self._listeners.items()
                },
            )
        )
        (state / "log4j2.xml").write_text(render_log4j2(state / "kafka.log"))
        args = ["kafka.tools.StorageTool", "format", "--standalone",
                "-t", random_cluster_id(), "-c", str(state / "server.properties")]  # fmt: skip
        for user, password in self._scram_users.items():
            args += ["--add-scram", f"{self._scram_mechanism}=[name={user},password={password}]"]
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


def _listener_ports(properties: str) -> tuple[int, int] | None:
    """(client port, controller port) from a server.properties written by ``_prepare``."""
    for line in properties.splitlines():
        if line.startswith("listeners="):
            found = dict(
                (name, int(address.rsplit(":", 1)[1]))
                for name, address in (
                    item.split("://", 1) for item in line.split("=", 1)[1].split(",")
                )
            )
            if "PLAINTEXT" in found and "CONTROLLER" in found:
                return found["PLAINTEXT"], found["CONTROLLER"]
    return None
