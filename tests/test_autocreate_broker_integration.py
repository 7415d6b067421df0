"""The topic contract on a broker with ``auto.create.topics.enable=true`` (Apache Kafka's
default; the session broker of the other tests has it off).

Before: every topic the connector described was created by the broker, because aiokafka's
``describe_topics`` asks for auto-creation. A dedup changelog deleted while the connector
was stopped was re-created empty at the next start (one partition, ``cleanup.policy=
delete``, then grown and "corrected"), so the refusal meant for a lost changelog never
fired and the replays of processed events made second threads; a typo'd input topic was
created too, and ``kafka.create_topics: false`` created the results topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from connector.app import Connector
from connector.dedup import changelog_topic
from connector.localkafka import LocalKafka
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, ensure_topics, event, make_settings, produce, running
from tests.harness import wait_until_committed as committed
from tests.kafka_helpers import create_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def autocreate_kafka() -> Iterator[str]:
    kafka = LocalKafka(broker_config={"auto.create.topics.enable": "true"})
    with kafka:
        yield kafka.bootstrap_servers


async def topics_of(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


async def delete(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def until_not_ready(connector: Connector, *words: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    detail = ""
    while time.monotonic() < deadline:
        ready, detail = connector._ready()
        if not ready and all(w in detail for w in words):
            return detail
        await asyncio.sleep(0.1)
    raise TimeoutError(f"readiness never named {words}: last {detail!r}")


async def test_a_changelog_deleted_while_stopped_is_not_auto_created(
    autocreate_kafka: str,
) -> None:
    bootstrap = autocreate_kafka
    names = Names.fresh("autocl")
    async with ThreadsApiSimulator(SimulatorSettings(seed=41)) as sim:
        settings = make_settings(
            bootstrap,
            sim.base_url,
            names,
            partitions=2,
            kafka={"create_input_topics": True, "retry_initial_s": 0.2, "retry_max_s": 0.5},
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        await ensure_topics(settings)
        processed = [f"p-{i}" for i in range(6)]
        await produce(bootstrap, names.input, [(f"k{i}".encode(), event(i)) for i in processed])
        async with running(settings):
            await committed(bootstrap, names.group, names.input)
        await delete(bootstrap, changelog)
        await produce(bootstrap, names.input, [(f"k{i}".encode(), event(i)) for i in processed])

        connector = Connector(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(connector.run(stop))
        try:
            await until_not_ready(connector, changelog, "committed offsets")
            await asyncio.sleep(1.0)  # several attempts: none may create it
            assert changelog not in await topics_of(bootstrap)
            assert not connector.started.is_set()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        counts = sim.store.count_by_event_id()
        assert all(counts[i] == 1 for i in processed), Counter(counts)


async def test_describing_topics_creates_none(autocreate_kafka: str) -> None:
    """A typo'd input topic and, with ``create_topics: false``, missing output topics are
    named, not created by the broker."""
    bootstrap = autocreate_kafka
    names = Names.fresh("autonone")
    async with ThreadsApiSimulator(SimulatorSettings(seed=42)) as sim:
        settings = make_settings(
            bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={
                "create_topics": False,
                "create_input_topics": False,
                "retry_initial_s": 0.2,
                "retry_max_s": 0.5,
            },
        )
        connector = Connector(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(connector.run(stop))
        try:
            await until_not_ready(connector, names.input, "do not exist")
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        present = set(await topics_of(bootstrap))
        assert not present & {names.input, names.results, names.dead}, present


async def test_a_retention_inherited_from_the_broker_is_judged(autocreate_kafka: str) -> None:
    """A changelog without a retention.ms of its own takes the cluster's default
    (log.retention.ms, set here as the broker's dynamic configuration): the effective value
    is the one judged."""
    bootstrap = autocreate_kafka
    names = Names.fresh("inherit")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    (broker,) = [str(b["node_id"]) for b in (await admin.describe_cluster())["brokers"]]
    cluster = ConfigResource(
        ConfigResourceType.BROKER, broker, configs={"log.retention.ms": "5000"}
    )
    try:
        async with ThreadsApiSimulator(SimulatorSettings(seed=44)) as sim:
            settings = make_settings(
                bootstrap,
                sim.base_url,
                names,
                partitions=1,
                kafka={"create_topics": False, "retry_initial_s": 0.2, "retry_max_s": 0.5},
                dedup={"ttl_s": 3600},
            )
            changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
            await create_topics(bootstrap, {names.input: 1, names.results: 1, names.dead: 1})
            await create_topics(
                bootstrap, {changelog: 1}, config={"cleanup.policy": "compact,delete"}
            )
            await admin.alter_configs([cluster])
            connector = Connector(settings)
            stop = asyncio.Event()
            task = asyncio.create_task(connector.run(stop))
            try:
                await until_not_ready(connector, changelog, "retention.ms=5000", "3600000")
                assert not connector.started.is_set()
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        cluster = ConfigResource(ConfigResourceType.BROKER, broker, configs={})
        with contextlib.suppress(Exception):
            await admin.alter_configs([cluster])
        await admin.close()
