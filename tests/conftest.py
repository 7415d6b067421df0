"""Shared fixtures: one real Kafka broker for the whole test session.

``kafka_bootstrap`` takes, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` if set (an existing broker; nothing is started);
2. a testcontainers Kafka if a Docker engine answers (``KAFKA_TEST_IMAGE`` picks the image);
3. the project's local Apache Kafka (``connector.localkafka``): jars from Maven Central,
   started with ``java``, stopped when the session ends.
``KAFKA_TEST_BACKEND=local`` skips the Docker probe. Integration tests never skip for want
of Docker. Helpers (names, topics, produce, read back, offsets) are in
``tests/kafka_helpers.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from connector.localkafka import LocalKafka

logger = logging.getLogger(__name__)

DEFAULT_TEST_IMAGE = "confluentinc/cp-kafka:7.6.0"


def docker_answers(timeout_s: float = 3.0) -> bool:
    """True if a Docker engine responds to ``docker info`` within ``timeout_s``."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        proc = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except Exception:
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _start_container() -> Any:
    from testcontainers.community.kafka import KafkaContainer

    container = (
        KafkaContainer(os.environ.get("KAFKA_TEST_IMAGE", DEFAULT_TEST_IMAGE))
        .with_kraft()
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        .with_env("KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", "1000")
    )
    container.start(timeout=180)
    return container


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the session's Kafka broker (see the module docstring)."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        yield env
        return
    if os.environ.get("KAFKA_TEST_BACKEND", "") != "local" and docker_answers():
        container = None
        try:
            container = _start_container()
        except Exception:
            logger.warning("testcontainers Kafka failed; using the local broker", exc_info=True)
        if container is not None:
            try:
                yield str(container.get_bootstrap_server())
            finally:
                container.stop()
            return
    with LocalKafka() as kafka:
        yield kafka.bootstrap_servers


@pytest.fixture
def private_kafka() -> Iterator[LocalKafka]:
    """A broker of the test's own (started, stopped afterwards), for tests that kill or
    restart a broker without disturbing the shared one. Costs a broker start (~2-3 s)."""
    with LocalKafka() as kafka:
        yield kafka


@pytest.fixture(scope="session")
def apicurio() -> Iterator[Any]:
    """A real schema registry (Apicurio, Confluent-compatible API) for the session; fetched
    once per machine (``tests/apicurio.py``). Tests use fresh subjects."""
    from tests.apicurio import Apicurio

    with Apicurio() as registry:
        yield registry


@pytest.fixture
def private_apicurio() -> Iterator[Any]:
    """A registry of the test's own, for tests that stop and restart it."""
    from tests.apicurio import Apicurio

    with Apicurio() as registry:
        yield registry
