"""A drain whose last commit cycle cannot finish (its results topic deleted, auto-creation
off) on a real broker: the connector returns within ``delivery.drain_timeout_s``, says
that the last cycle missed the deadline, and counts no producer fence for it (the
ProducerFenced alert reads that counter)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from connector.app import Connector
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, make_settings, produce, running
from tests.harness import wait_until_committed as committed

pytestmark = pytest.mark.integration
DRAIN_S = 6.0


async def test_a_missed_drain_deadline_is_not_a_fence(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names.fresh("overrun")
    async with ThreadsApiSimulator(SimulatorSettings(seed=61)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            delivery={"drain_timeout_s": DRAIN_S, "revoke_timeout_s": DRAIN_S},
        )
        caplog.set_level("INFO", logger="connector.app")
        async with running(settings) as connector:
            await produce(kafka_bootstrap, names.input, [(b"k", event("before"))])
            await committed(kafka_bootstrap, names.group, names.input)
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([names.results])
            finally:
                await admin.close()
            await produce(kafka_bootstrap, names.input, [(b"k", event("stuck"))])
            deadline = time.monotonic() + 30
            while sim.store.count_by_event_id().get("stuck") != 1:
                assert time.monotonic() < deadline, "the call never happened"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # its commit cycle waits for the deleted topic
            stopped = time.monotonic()
        elapsed = time.monotonic() - stopped
    assert elapsed <= DRAIN_S + 0.5, elapsed
    assert isinstance(connector, Connector)
    fenced = connector.metrics.registry.get_sample_value("threads_connector_producer_fenced_total")
    assert fenced == 0, fenced
    messages = [r.getMessage() for r in caplog.records]
    assert any("drain deadline" in m for m in messages), messages
    assert not any("rejoining" in m for m in messages), messages
