"""A real schema registry for the format tests: Apicurio Registry, its Confluent-compatible
``ccompat`` API, from Maven Central (``scripts/fetch-apicurio.sh``, cached per machine;
``make tools`` runs it so CI has it before the tests), started with ``java`` on free
loopback ports and stopped at the end.

Its storage is an H2 database in a file of the instance's own: a registry stopped and
started again on the same ports serves the same schemas under the same ids (the outage
test stops it and brings it back).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from connector.localkafka.ports import free_ports

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "scripts" / "fetch-apicurio.sh"
START_TIMEOUT_S = 90.0  # ~4.5 s alone; doubles or worse when the other core is busy


def fetch() -> tuple[str, str]:
    """(java, runnable jar), fetching Apicurio first if this machine has not yet."""
    done = subprocess.run(
        ["bash", str(FETCH)], capture_output=True, text=True, check=False, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"fetching Apicurio failed: {done.stderr[-2000:]}")
    directory = Path(done.stdout.strip().splitlines()[-1])
    java = (directory / "java").read_text().strip()
    jar = (directory / "jar").read_text().strip()
    return java, jar


class Apicurio:
    """One registry process; ``url`` is the ccompat base URL the connector is given."""

    def __init__(self) -> None:
        self.java, self.jar = fetch()
        self.port, self.management_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}/apis/ccompat/v7"
        self._dir = Path(tempfile.mkdtemp(prefix="apicurio-"))
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Apicurio:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def start(self) -> None:
        database = self._dir / "registry"
        command = [
            self.java,
            "-Xmx384m",
            "-XX:TieredStopAtLevel=1",  # starts faster; a test registry serves little
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            "-Dquarkus.management.host=127.0.0.1",
            f"-Dquarkus.management.port={self.management_port}",
            f"-Dapicurio.datasource.url=jdbc:h2:file:{database};DB_CLOSE_ON_EXIT=FALSE",
            f"-Dquarkus.datasource.jdbc.url=jdbc:h2:file:{database};DB_CLOSE_ON_EXIT=FALSE",
            "-jar",
            self.jar,
        ]
        log = (self._dir / "registry.log").open("ab")
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir, env=dict(os.environ)
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Apicurio exited at start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/subjects", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Apicurio did not answer within {START_TIMEOUT_S:g}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        path = self._dir / "registry.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
