"""Inputs written by a transactional producer end with a commit marker: the committed
offset must reach the end offset (no lag of 1 that keeps ``NoProgress`` firing)."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    Names,
    committed_and_end,
    ensure_topics,
    event,
    make_settings,
    running,
    wait_until_committed,
)

pytestmark = pytest.mark.integration


async def produce_in_transaction(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    await producer.start()
    try:
        async with producer.transaction():
            for i, value in enumerate(values):
                await producer.send(topic, value=value, key=f"k{i}".encode(), partition=0)
    finally:
        await producer.stop()


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_committed_offset_passes_the_transaction_marker(
    kafka_bootstrap: str, mode: str
) -> None:
    names = Names.fresh(f"marker-{mode[:5]}")
    async with ThreadsApiSimulator(SimulatorSettings(seed=5)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=1, delivery={"mode": mode}
        )
        await ensure_topics(settings)
        async with running(settings) as connector:
            values = [event(f"tx-{i}") for i in range(5)]
            await produce_in_transaction(kafka_bootstrap, names.input, values)
            # offsets 0-4 are the events, 5 the commit marker: the end offset is 6
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=30)
            committed, ends = await committed_and_end(kafka_bootstrap, names.group, names.input)
            assert ends == {0: 6} and committed == {0: 6}
            assert connector.sessions == 1
        assert sim.store.count_by_event_id() == {f"tx-{i}": 1 for i in range(5)}
