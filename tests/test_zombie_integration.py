"""A replica paused past its session timeout (SIGSTOP: a long GC pause, a frozen node) wakes
up as a zombie: its partitions belong to another replica, but it still holds calls and a
commit cycle for them. Its transaction must be refused (KIP-447, ``connector.fencing``), so
no result is published twice (read_committed), nothing is lost, and it says so and rejoins.
Real broker, two ``connector run`` processes, the simulator at 1 s latency."""

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

import pytest
import yaml

from connector.config import ConnectorSettings
from connector.simulator import LatencySpec, SimulatorSettings, run_in_thread
from tests.harness import (
    API_KEY,
    Names,
    ensure_topics,
    event,
    make_settings,
    produce,
    results,
    wait_until_committed,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_TIMEOUT_MS = 6_000
PAUSE_S = SESSION_TIMEOUT_MS / 1000 + 6  # well past the session timeout: the group moves on


@contextmanager
def replica(settings: ConnectorSettings, name: str, tmp_path: Path) -> Iterator[Path]:
    """One ``connector run`` process (its log's path), stopped with SIGTERM at the end."""
    data = settings.model_dump(mode="json", exclude={"api": {"api_key"}})
    data["delivery"]["instance_id"] = name
    data["logging"] = {"level": "INFO", "format": "text"}
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    log_path = tmp_path / f"{name}.log"
    env = {**os.environ, "THREADS_CONNECTOR_API__API_KEY": API_KEY}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "run", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=log,
        )
        replica.procs[name] = proc  # type: ignore[attr-defined]
        try:
            yield log_path
        finally:
            proc.send_signal(signal.SIGCONT)  # in case the test failed while it was paused
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


replica.procs = {}  # type: ignore[attr-defined]


async def until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def test_a_paused_replica_wakes_up_fenced_and_publishes_no_duplicate(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh("zombie")
    with run_in_thread(SimulatorSettings(seed=19)) as sim:
        sim.set_behavior(
            sim.behavior.model_copy(
                update={"latency": LatencySpec(distribution="fixed", median_ms=1000)}
            )
        )
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=6,
            api={"rate_limit_per_s": 40, "rate_limit_burst": 10, "max_in_flight": 64},
            kafka={"session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": 500},
        )
        await ensure_topics(settings)
        ids = [f"z-{i}" for i in range(360)]
        await produce(
            kafka_bootstrap, names.input, [(i.encode(), event(i, user=f"u{i}")) for i in ids]
        )
        with (
            replica(settings, "zombie", tmp_path) as zombie_log,
            replica(settings, "survivor", tmp_path),
        ):
            # both at work (each has calls on the wire at 1 s latency), then pause one
            await until(lambda: len(sim.store.count_by_event_id()) >= 60, 60, "no progress")
            await until(
                lambda: zombie_log.read_text().count("partitions assigned") >= 1, 30, "not joined"
            )
            zombie = replica.procs["zombie"]  # type: ignore[attr-defined]
            zombie.send_signal(signal.SIGSTOP)
            await asyncio.sleep(PAUSE_S)  # the pause itself is what is tested
            zombie.send_signal(signal.SIGCONT)
            # the zombie's next commit (its cycle's or its revocation's) is refused by the
            # broker; it says so and starts a new session
            rejoined = "session ended without committing, rejoining"
            await until(lambda: rejoined in zombie_log.read_text(), 60, "no fencing logged")
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
        log = zombie_log.read_text()
        out = await results(kafka_bootstrap, names.results)
    counts = Counter(str(r["eventId"]) for r in out)
    assert set(counts) == set(ids), f"lost: {sorted(set(ids) - set(counts))[:10]}"
    dupes = {e: c for e, c in counts.items() if c > 1}
    assert not dupes, f"{len(dupes)} duplicate results (read_committed): {list(dupes)[:10]}"
    # the zombie was refused by the broker, said so, and rejoined with a fresh session
    assert "no longer in the group" in log, log[-3000:]
