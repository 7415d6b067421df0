"""Kafka's jars from Maven Central: the POM, finding ``mvn``/``java``, the cached fetch."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path

from connector.localkafka.common import (
    CACHE_ENV,
    KAFKA_VERSION,
    LOG4J_VERSION,
    LocalKafkaError,
    _tail,
    logger,
)

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
