"""A dedup changelog deleted under a running connector process, on a real broker.

Before: readiness turned red, but SIGTERM did not end the process within 40 s (the last
commit cycle waited for the deleted topic for ever), and the restart re-created the
changelog empty: a replay of 10 processed events made 20 threads. Now the process ends
within ``delivery.drain_timeout_s`` of the SIGTERM, and the restart does not re-create the
changelog of a group that has committed offsets: it stays not ready, naming the topic and
the command that accepts the loss, and makes no thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from connector.config import ConnectorSettings
from connector.dedup import changelog_topic
from connector.localkafka.ports import free_ports
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import API_KEY, Names, ensure_topics, event, make_settings, produce
from tests.harness import wait_until_committed as committed

pytestmark = pytest.mark.integration
DRAIN_S = 8.0


@contextmanager
def connector_process(
    settings: ConnectorSettings, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "connector.yaml"
    data = settings.model_dump(mode="json", exclude={"api": {"api_key"}})
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "THREADS_CONNECTOR_API__API_KEY": API_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.log").open("ab"),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def readiness(port: int) -> tuple[int, str]:
    async with httpx.AsyncClient() as http:
        try:
            response = await http.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        except httpx.HTTPError:
            return 0, ""
        return response.status_code, response.text


async def until_not_ready_naming(port: int, *words: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        status, text = await readiness(port)
        if status == 503 and all(w in text for w in words):
            return text
        await asyncio.sleep(0.2)
    raise TimeoutError(f"readiness never named {words}: last {text!r}")


async def sigterm_and_time(proc: subprocess.Popen[bytes], bound_s: float) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None and time.monotonic() - started < bound_s + 10:
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_changelog_deleted_while_running(kafka_bootstrap: str, tmp_path: Path) -> None:
    names = Names.fresh("clgone")
    (port,) = free_ports(1)
    async with ThreadsApiSimulator(SimulatorSettings(seed=31)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            server={"host": "127.0.0.1", "port": port},
            delivery={"drain_timeout_s": DRAIN_S, "revoke_timeout_s": DRAIN_S},
            dedup={"changelog_check_interval_s": 1},
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        await ensure_topics(settings)
        processed = [f"p-{i}" for i in range(10)]
        await produce(kafka_bootstrap, names.input, [(b"k", event(i)) for i in processed])

        with connector_process(settings, tmp_path) as proc:
            await committed(kafka_bootstrap, names.group, names.input)
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([changelog])
            finally:
                await admin.close()
            await produce(kafka_bootstrap, names.input, [(b"k", event("after"))])
            await until_not_ready_naming(port, changelog, "does not exist")
            elapsed = await sigterm_and_time(proc, DRAIN_S)
            assert proc.poll() is not None, f"still running {elapsed:.1f}s after SIGTERM"
            assert elapsed <= DRAIN_S + 0.5, elapsed

        # the restart: the changelog is not re-created empty, nothing is processed
        await produce(kafka_bootstrap, names.input, [(b"k", event(i)) for i in processed])
        with connector_process(settings, tmp_path) as proc:
            text = await until_not_ready_naming(port, changelog, "committed offsets")
            assert "kafka-topics.sh --create" in text
            await asyncio.sleep(2.0)  # it keeps checking; no call may start meanwhile
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                assert changelog not in await admin.list_topics()
            finally:
                await admin.close()
            elapsed = await sigterm_and_time(proc, DRAIN_S)
            assert proc.poll() is not None and elapsed <= DRAIN_S + 0.5, elapsed
        counts = sim.store.count_by_event_id()
        assert all(counts[i] == 1 for i in processed), Counter(counts)
