"""Running Java on Kafka's classpath: JVM options, the class-data archive, CLI tools."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from connector.localkafka.common import LocalKafkaError, _tail
from connector.localkafka.jars import ensure_jars, find_executable
from connector.localkafka.properties import _PATTERN, LOG4J2_TEMPLATE

# Quick JVM start for short-lived tools (their stdout is parsed: JVM warnings go to stderr);
# the broker keeps the default JIT. Both use an AppCDS archive made on first use.
_TOOL_JVM_OPTS = (
    "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
    "-Xlog:disable", "-Xlog:all=warning:stderr",
)  # fmt: skip
_BROKER_JVM_OPTS = ("-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
CDS_ENV = "THREADS_CONNECTOR_KAFKA_CDS"  # "0" turns class-data-sharing archives off


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
