"""Commit cycles start when there is work, not on a timer (issue 11: added latency)."""

from __future__ import annotations

import asyncio

import pytest

from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    Names,
    event,
    make_settings,
    produce,
    results,
    running,
    wait_until_committed,
)

pytestmark = pytest.mark.integration

# far longer than the test may take: a cycle that waited for it would never be seen
INTERVAL_MS = 300_000


@pytest.fixture
async def sim() -> ThreadsApiSimulator:
    async with ThreadsApiSimulator(SimulatorSettings(seed=1)) as simulator:
        yield simulator


async def _joined(connector: object) -> None:
    while not getattr(connector, "_joined", False):
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_an_outcome_starts_a_commit_cycle_before_the_interval(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    """``commit_interval_ms`` bounds how long an outcome may wait; it is not a timer every
    outcome waits for. With an interval of 5 minutes, events are committed (result
    visible to read_committed readers, offsets committed) within the test's own timeout,
    twice: the first cycle and one after it."""
    names = Names.fresh(f"cc-{mode}")
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        delivery={"mode": mode, "commit_interval_ms": INTERVAL_MS},
    )
    async with running(settings) as connector:
        await asyncio.wait_for(_joined(connector), 60)
        for batch in range(2):
            ids = [f"e-{batch}-{i}" for i in range(3)]
            await produce(kafka_bootstrap, names.input, [(None, event(i)) for i in ids])
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
            out = await results(kafka_bootstrap, names.results)
            assert set(ids) <= {r["eventId"] for r in out}
