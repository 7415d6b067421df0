"""SIGTERM in states the drain-deadline tests did not see, on real processes: a connector
process ends within ``delivery.drain_timeout_s`` of the signal with calls hung on an API
that never answers, and while its broker is down; what it had not committed is processed
by the next run (no event lost).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.localkafka import LocalKafka
from connector.localkafka.ports import free_ports
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.simulator.settings import HostileSpec
from tests.harness import Names, ensure_topics, event, make_settings, produce, read_all
from tests.harness import wait_until_committed as committed
from tests.test_changelog_deleted_integration import (
    connector_process,
    readiness,
    sigterm_and_time,
)

pytestmark = pytest.mark.integration
DRAIN_S = 6.0


@pytest.fixture
def own_kafka() -> Iterator[LocalKafka]:
    kafka = LocalKafka()
    with kafka:
        yield kafka


async def until_ready(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (await readiness(port))[0] != 200:
        assert time.monotonic() < deadline, "never ready"
        await asyncio.sleep(0.2)


async def test_sigterm_with_calls_hung_on_a_silent_api(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh("hungstop")
    (port,) = free_ports(1)
    silent = SimulatorSettings(seed=51, hostile=HostileSpec(mode="black_hole", count=8))
    async with ThreadsApiSimulator(silent) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            server={"host": "127.0.0.1", "port": port},
            api={"request_timeout_s": 5},
            delivery={"drain_timeout_s": DRAIN_S, "revoke_timeout_s": DRAIN_S},
        )
        await ensure_topics(settings)
        ids = [f"h-{i}" for i in range(8)]
        await produce(kafka_bootstrap, names.input, [(i.encode(), event(i)) for i in ids])
        with connector_process(settings, tmp_path) as proc:
            await until_ready(port)
            await asyncio.sleep(2.0)  # the calls are out, and hang
            elapsed = await sigterm_and_time(proc, DRAIN_S)
            assert proc.poll() is not None, f"still running {elapsed:.1f}s after SIGTERM"
            assert elapsed <= DRAIN_S + 0.5, elapsed
        # the black hole has had its 8 requests: the next run answers every event
        with connector_process(settings, tmp_path) as proc:
            await committed(kafka_bootstrap, names.group, names.input)
            await sigterm_and_time(proc, DRAIN_S)
        counts = sim.store.count_by_event_id()
        assert all(counts.get(i) == 1 for i in ids), Counter(counts)


async def test_sigterm_while_the_broker_is_down(own_kafka: LocalKafka, tmp_path: Path) -> None:
    bootstrap = own_kafka.bootstrap_servers
    names = Names.fresh("downstop")
    (port,) = free_ports(1)
    async with ThreadsApiSimulator(SimulatorSettings(seed=52)) as sim:
        settings = make_settings(
            bootstrap,
            sim.base_url,
            names,
            partitions=2,
            server={"host": "127.0.0.1", "port": port},
            delivery={"drain_timeout_s": DRAIN_S, "revoke_timeout_s": DRAIN_S},
        )
        await ensure_topics(settings)
        first = [f"a-{i}" for i in range(5)]
        await produce(bootstrap, names.input, [(i.encode(), event(i)) for i in first])
        with connector_process(settings, tmp_path) as proc:
            await committed(bootstrap, names.group, names.input)
            own_kafka.kill_hard()
            await asyncio.sleep(3.0)  # the connector notices: commits and fetches fail
            elapsed = await sigterm_and_time(proc, DRAIN_S)
            assert proc.poll() is not None, f"still running {elapsed:.1f}s after SIGTERM"
            assert elapsed <= DRAIN_S + 0.5, elapsed
        own_kafka.start()
        later = [f"b-{i}" for i in range(5)]
        await produce(bootstrap, names.input, [(i.encode(), event(i)) for i in later])
        with connector_process(settings, tmp_path) as proc:
            await committed(bootstrap, names.group, names.input)
            await sigterm_and_time(proc, DRAIN_S)
        counts = sim.store.count_by_event_id()
        assert all(counts.get(i) == 1 for i in first + later), Counter(counts)


async def test_sigterm_while_a_route_is_paused_keeps_its_events(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A wrong API path pauses the route (404 for a run of events); SIGTERM then ends the
    process promptly, and the held events are not committed: the next run, with the
    path fixed, makes each one thread (those dead-lettered before the pause excepted)."""
    names = Names.fresh("pausestop")
    (port,) = free_ports(1)
    async with ThreadsApiSimulator(SimulatorSettings(seed=53)) as sim:
        good = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            server={"host": "127.0.0.1", "port": port},
            delivery={"drain_timeout_s": DRAIN_S, "revoke_timeout_s": DRAIN_S},
            api={"pause_after_failures": 3, "request_timeout_s": 5},
        )
        wrong = good.model_copy(
            update={"api": good.api.model_copy(update={"base_url": sim.base_url + "/api/v1"})}
        )
        await ensure_topics(good)
        ids = [f"w-{i}" for i in range(12)]
        await produce(kafka_bootstrap, names.input, [(i.encode(), event(i)) for i in ids])
        with connector_process(wrong, tmp_path) as proc:
            deadline = time.monotonic() + 60
            while "404" not in (await readiness(port))[1]:
                assert time.monotonic() < deadline, "the route never paused"
                await asyncio.sleep(0.2)
            elapsed = await sigterm_and_time(proc, DRAIN_S)
            assert proc.poll() is not None, f"still running {elapsed:.1f}s after SIGTERM"
            assert elapsed <= DRAIN_S + 0.5, elapsed
        dead = {
            dict(m.headers)["dlq-event-id"].decode()
            for m in await read_all(kafka_bootstrap, names.dead)
        }
        assert len(dead) <= 3, dead  # the run that paused the route, at most
        with connector_process(good, tmp_path) as proc:
            await committed(kafka_bootstrap, names.group, names.input)
            await sigterm_and_time(proc, DRAIN_S)
        counts = sim.store.count_by_event_id()
        assert all(counts.get(i) == 1 for i in ids if i not in dead), Counter(counts)
