"""Transactional ids are unique per consumer group and replica: two connectors of different
groups on one host (one ``delivery.instance_id``, the host name by default) never fence
each other. Real broker, both connectors in this process."""

from __future__ import annotations

from collections import Counter

import pytest

from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.sink import transactional_id
from tests.harness import (
    Names,
    ensure_topics,
    event,
    make_settings,
    produce,
    results,
    running,
    wait_until_committed,
)

pytestmark = [pytest.mark.integration]


def test_the_transactional_id_names_the_group_and_the_instance() -> None:
    settings = make_settings(
        "127.0.0.1:1", "http://127.0.0.1:1", Names("in", "out", "dlq", "orders"),
        delivery={"instance_id": "host-1"},
    )  # fmt: skip
    assert transactional_id(settings) == "threads-connector-orders-host-1"


async def test_two_groups_on_one_host_do_not_fence_each_other(kafka_bootstrap: str) -> None:
    first, second = Names.fresh("txa"), Names.fresh("txb")
    async with ThreadsApiSimulator(SimulatorSettings(seed=20)) as sim:
        a, b = (
            make_settings(kafka_bootstrap, sim.base_url, names, delivery={"instance_id": "host"})
            for names in (first, second)
        )
        for settings in (a, b):
            await ensure_topics(settings)
        async with running(a) as one:
            await produce(kafka_bootstrap, first.input, [(b"u", event("a-1"))])
            await wait_until_committed(kafka_bootstrap, first.group, first.input)
            async with running(b) as two:  # its producer starts under its own id
                await produce(kafka_bootstrap, first.input, [(b"u", event("a-2"))])
                await produce(kafka_bootstrap, second.input, [(b"u", event("b-1"))])
                await wait_until_committed(kafka_bootstrap, first.group, first.input)
                await wait_until_committed(kafka_bootstrap, second.group, second.input)
    fences = [c.metrics.fenced._value.get() for c in (one, two)]
    assert fences == [0, 0], fences
    assert one.sessions == 1 and two.sessions == 1
    ids = Counter(str(r["eventId"]) for r in await results(kafka_bootstrap, first.results))
    assert ids == {"a-1": 1, "a-2": 1}
