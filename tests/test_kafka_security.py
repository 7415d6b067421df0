"""The connector through SASL_SSL (SCRAM-SHA-512) and mTLS listeners of a real broker, and
what happens when Kafka cannot be used: the process stays up, ``/readyz`` answers 503 with
the cause, one log line per attempt and no traceback, and it becomes ready by itself once
the cause is fixed.

One broker for the module, with three listeners: PLAINTEXT (the test's own producer and
reader), SECURE (SASL_SSL, SCRAM-SHA-512) and MTLS (SSL, client certificate required).
Certificates are made at test time (tests/tls_helpers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from connector.app import Connector
from connector.config import ConnectorSettings
from connector.localkafka import LocalKafka
from connector.localkafka.ports import free_ports
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    API_KEY,
    ROUTES,
    Names,
    event,
    make_settings,
    produce,
    results,
    wait_until_committed,
)
from tests.tls_helpers import Pki, make_pki, secure_broker_config

pytestmark = pytest.mark.integration

SCRAM_USER = "connector"
SCRAM_PASSWORD = "scram-pw-5d4c3b-must-not-leak"
FAST_RETRY = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "probe_interval_s": 0.5}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_kafka(pki: Pki) -> Iterator[LocalKafka]:
    kafka = LocalKafka(
        listeners={"SECURE": "SASL_SSL", "MTLS": "SSL"},
        scram_users={SCRAM_USER: SCRAM_PASSWORD},
        broker_config=secure_broker_config(pki),
    )
    with kafka:
        yield kafka


@pytest.fixture
async def sim() -> AsyncIterator[ThreadsApiSimulator]:
    async with ThreadsApiSimulator(SimulatorSettings(seed=7)) as simulator:
        yield simulator


def sasl_ssl(kafka: LocalKafka, pki: Pki, password_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap_servers": kafka.listener_address("SECURE"),
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": SCRAM_USER,
        "sasl_password_file": str(password_file),
        "ssl_cafile": str(pki.ca),
        **FAST_RETRY,
        **extra,
    }


def mtls(kafka: LocalKafka, pki: Pki, key_password_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap_servers": kafka.listener_address("MTLS"),
        "security_protocol": "SSL",
        "ssl_cafile": str(pki.ca),
        "ssl_certfile": str(pki.client_cert),
        "ssl_keyfile": str(pki.client_key),
        "ssl_key_password_file": str(key_password_file),
        **FAST_RETRY,
        **extra,
    }


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n", encoding="utf-8")
    return path


async def end_to_end(plain: str, settings: ConnectorSettings, names: Names) -> None:
    """Events in through PLAINTEXT, the connector on its secure listener, results out."""
    connector = Connector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        await asyncio.wait_for(connector.started.wait(), 60)
        n = 20
        await produce(plain, names.input, [(b"u-1", event(f"s-{i}")) for i in range(n)])
        await wait_until_committed(plain, names.group, names.input)
        out = await results(plain, names.results)
        assert sorted(r["eventId"] for r in out) == sorted(f"s-{i}" for i in range(n))
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_sasl_ssl_scram_end_to_end(
    secure_kafka: LocalKafka, pki: Pki, sim: ThreadsApiSimulator, tmp_path: Path
) -> None:
    names = Names.fresh("sasl")
    password = secret_file(tmp_path, "sasl", SCRAM_PASSWORD)
    kafka = sasl_ssl(secure_kafka, pki, password)
    settings = make_settings(secure_kafka.bootstrap_servers, sim.base_url, names, kafka=kafka)
    await end_to_end(secure_kafka.bootstrap_servers, settings, names)


async def test_mtls_end_to_end(
    secure_kafka: LocalKafka, pki: Pki, sim: ThreadsApiSimulator, tmp_path: Path
) -> None:
    names = Names.fresh("mtls")
    key_password = secret_file(tmp_path, "keypw", pki.client_key_password)
    kafka = mtls(secure_kafka, pki, key_password)
    settings = make_settings(secure_kafka.bootstrap_servers, sim.base_url, names, kafka=kafka)
    await end_to_end(secure_kafka.bootstrap_servers, settings, names)


# -- failures: up, not ready, the cause said once per attempt, no traceback ---------------


@contextlib.asynccontextmanager
async def started_anyway(settings: ConnectorSettings) -> AsyncIterator[Connector]:
    """A connector that must keep running whatever Kafka does; stopped at the end."""
    connector = Connector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        for _ in range(100):
            if connector.health.port:
                break
            await asyncio.sleep(0.05)
        yield connector
        assert not task.done(), task.exception() if task.done() else None
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def readiness(connector: Connector) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=3) as http:
        response = await http.get(f"http://127.0.0.1:{connector.health.port}/readyz")
    return response.status_code, str(response.json()["detail"])


async def wait_ready(
    connector: Connector, want: int, saying: str = "", timeout_s: float = 60
) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status, detail = await readiness(connector)
        if status == want and saying in detail:
            return detail
        if time.monotonic() > deadline:
            raise TimeoutError(f"/readyz stayed {status}: {detail}")
        await asyncio.sleep(0.2)


def attempt_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "retrying in" in r.getMessage()]


def assert_quiet(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    assert all(r.exc_info is None for r in caplog.records), [
        r.getMessage() for r in caplog.records if r.exc_info
    ]
    assert "Traceback" not in caplog.text
    for secret in secrets:
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong SASL password", "authentication failed"),
        ("untrusted CA", "TLS verification failed"),
        ("missing client certificate", "requires a client certificate"),
        ("client certificate of another CA", "does not trust the client certificate"),
        ("wrong key password", "does not open with kafka.ssl_key_password"),
    ],
)
async def test_kafka_refusing_us_leaves_the_process_up_and_not_ready(
    secure_kafka: LocalKafka,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    expected: str,
) -> None:
    caplog.set_level(logging.INFO)
    names = Names.fresh("refused")
    wrong = "wrong-pw-1a2b-must-not-leak"
    password = secret_file(tmp_path, "sasl", SCRAM_PASSWORD)
    key_password = secret_file(tmp_path, "keypw", pki.client_key_password)
    kafka = {
        "wrong SASL password": sasl_ssl(secure_kafka, pki, secret_file(tmp_path, "bad", wrong)),
        "untrusted CA": sasl_ssl(secure_kafka, pki, password, ssl_cafile=str(pki.rogue_ca)),
        "missing client certificate": {
            **mtls(secure_kafka, pki, key_password),
            "ssl_certfile": None,
            "ssl_keyfile": None,
            "ssl_key_password_file": None,
        },
        "client certificate of another CA": {
            **mtls(secure_kafka, pki, key_password),
            "ssl_certfile": str(pki.rogue_client_cert),
            "ssl_keyfile": str(pki.rogue_client_key),
            "ssl_key_password_file": None,
        },
        "wrong key password": mtls(secure_kafka, pki, secret_file(tmp_path, "kp", wrong)),
    }[case]
    settings = make_settings(secure_kafka.bootstrap_servers, "http://127.0.0.1:9", names,
                             kafka=kafka)  # fmt: skip
    async with started_anyway(settings) as connector:
        await wait_ready(connector, 503, "kafka: ")
        while connector.kafka_attempts < 3:
            await asyncio.sleep(0.1)
        status, detail = await readiness(connector)
        assert status == 503
        assert expected in detail, detail
        assert detail.startswith("kafka: ")
        lines = attempt_lines(caplog)
        assert len(lines) >= 3
        assert all(expected in r.getMessage() for r in lines), [r.getMessage() for r in lines]
        # one line per attempt: aiokafka's own "Unable connect to" lines are not repeated
        assert not [r for r in caplog.records if r.getMessage().startswith("Unable connect")]
    assert_quiet(caplog, wrong, SCRAM_PASSWORD, pki.client_key_password)


async def test_fixing_the_sasl_password_makes_it_ready(
    secure_kafka: LocalKafka,
    pki: Pki,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rotated secret file (what a fixed Kubernetes Secret looks like) is read at the
    next attempt: no restart needed."""
    caplog.set_level(logging.INFO)
    names = Names.fresh("fixpw")
    password = secret_file(tmp_path, "sasl", "not-the-password")
    settings = make_settings(secure_kafka.bootstrap_servers, sim.base_url, names,
                             kafka=sasl_ssl(secure_kafka, pki, password))  # fmt: skip
    async with started_anyway(settings) as connector:
        await wait_ready(connector, 503, "authentication failed")
        password.write_text(SCRAM_PASSWORD, encoding="utf-8")
        await wait_ready(connector, 200)
        plain = secure_kafka.bootstrap_servers
        await produce(plain, names.input, [(b"u-1", event("after-fix"))])
        await wait_until_committed(plain, names.group, names.input)
    assert [r["eventId"] for r in await results(plain, names.results)] == ["after-fix"]
    assert_quiet(caplog, SCRAM_PASSWORD)


async def test_unreachable_until_the_broker_starts(
    sim: ThreadsApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    names = Names.fresh("late")
    port = free_ports(1)[0]
    settings = make_settings(f"127.0.0.1:{port}", sim.base_url, names, kafka=FAST_RETRY)
    late = LocalKafka(port=port)
    try:
        async with started_anyway(settings) as connector:
            await wait_ready(connector, 503, "kafka: ")
            while connector.kafka_attempts < 2:
                await asyncio.sleep(0.1)
            status, detail = await readiness(connector)
            assert (status, detail.split(" (")[0]) == (
                503,
                "kafka: unreachable: connection refused",
            )
            await asyncio.to_thread(late.start)
            await wait_ready(connector, 200)
            await produce(late.bootstrap_servers, names.input, [(b"u-1", event("late-1"))])
            await wait_until_committed(late.bootstrap_servers, names.group, names.input)
            out = await results(late.bootstrap_servers, names.results)
    finally:
        late.stop()
    assert [r["eventId"] for r in out] == ["late-1"]
    assert_quiet(caplog)


def test_the_process_stays_up_without_kafka(tmp_path: Path) -> None:
    """``connector run`` as a process: an unreachable bootstrap is no crash (exit 1 after a
    traceback was); /readyz says why, stderr has one line per attempt, no traceback."""
    port, health = free_ports(2)
    config = {
        "kafka": {"bootstrap_servers": f"127.0.0.1:{port}", **FAST_RETRY},
        "api": {"base_url": "http://127.0.0.1:9"},
        "routes": ROUTES,
        "server": {"host": "127.0.0.1", "port": health},
        "logging": {"format": "text"},
    }
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "THREADS_CONNECTOR_API__API_KEY": API_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "run", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        status, detail = 0, ""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                response = httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=3)
                status, detail = response.status_code, response.json()["detail"]
                if "attempt 3" in detail:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the process exited"
        assert status == 503
        assert "kafka: unreachable: connection refused" in detail
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    attempts = [line for line in output.splitlines() if "retrying in" in line]
    assert len(attempts) >= 3, output
    assert all("unreachable: connection refused" in line for line in attempts)
    assert "Unable connect" not in output


async def test_a_broker_lost_mid_run_turns_readiness_red_then_green(
    private_kafka: LocalKafka, sim: ThreadsApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The session fails later (the broker dies): the process stays up, not ready with
    the cause, and recovers once the broker is back."""
    caplog.set_level(logging.INFO)
    names = Names.fresh("lost")
    plain = private_kafka.bootstrap_servers
    settings = make_settings(plain, sim.base_url, names, kafka=FAST_RETRY)
    async with started_anyway(settings) as connector:
        await wait_ready(connector, 200)
        await asyncio.to_thread(private_kafka.kill_hard)
        detail = await wait_ready(connector, 503, "kafka: unreachable", timeout_s=30)
        await asyncio.to_thread(private_kafka.start)
        await wait_ready(connector, 200, timeout_s=90)
        await produce(plain, names.input, [(b"u-1", event("back-1"))])
        await wait_until_committed(plain, names.group, names.input)
    assert [r["eventId"] for r in await results(plain, names.results)] == ["back-1"]
    assert "connection refused" in detail, detail
