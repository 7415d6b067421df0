"""Input topics changed under a running connector, on a real broker.

Partitions added to an input topic reach the running replica at its next metadata refresh
(``kafka.metadata_max_age_ms``) as a rebalance. Its dedup changelog still had the old
partition count: restoring a new partition's changelog partition failed ("no fetch
response"), the session restarted, and again, forever: the new partitions were never
consumed, and a restarted replica refused to start (changelog not co-partitioned). Now the
changelog grows with the input (its records name their partition, so the old ones keep
their place), the session restarts once with fresh clients, and the rate share counts
the new partitions.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from connector.dedup import changelog_topic
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, make_settings, results, running, wait_until_committed

pytestmark = pytest.mark.integration


async def produce_to(bootstrap: str, topic: str, partition: int, ids: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event_id in ids:
            await producer.send_and_wait(topic, event(event_id), key=b"k", partition=partition)
    finally:
        await producer.stop()


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        return {t["topic"]: len(t["partitions"]) for t in described}
    finally:
        await admin.close()


async def test_partitions_added_to_the_input_while_running(kafka_bootstrap: str) -> None:
    names = Names.fresh("grow")
    async with ThreadsApiSimulator(SimulatorSettings(seed=11)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=2, kafka={"metadata_max_age_ms": 1000}
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        async with running(settings) as connector:
            before = [f"before-{p}-{i}" for p in range(2) for i in range(5)]
            for p in range(2):
                await produce_to(kafka_bootstrap, names.input, p, before[p * 5 : p * 5 + 5])
            await wait_until_committed(kafka_bootstrap, names.group, names.input)

            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.create_partitions({names.input: NewPartitions(4)})
            finally:
                await admin.close()
            after = [f"after-{p}-{i}" for p in range(4) for i in range(5)]
            for p in range(4):
                await produce_to(kafka_bootstrap, names.input, p, after[p * 5 : p * 5 + 5])
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
            await asyncio.sleep(0.5)  # a crash in the last cycle would show below
            assert sum(connector.input_partitions.values()) == 4

        out = await results(kafka_bootstrap, names.results)
        assert Counter(r["eventId"] for r in out) == Counter(before + after)
        assert sim.store.count_by_event_id() == Counter(before + after)
        assert (await partition_counts(kafka_bootstrap, [changelog]))[changelog] == 4


async def test_a_deleted_results_topic_is_named_on_readiness(kafka_bootstrap: str) -> None:
    """The results topic deleted under a running connector (auto-create off): the commit
    cycle waits on the producer, which retries silently; readiness said nothing for a
    minute, then only "no successful commit cycle". Now it names the topic, and once the
    topic is back every event is published, once."""
    names = Names.fresh("gone")
    async with ThreadsApiSimulator(SimulatorSettings(seed=12)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
        async with running(settings) as connector:
            await produce_to(kafka_bootstrap, names.input, 0, ["one", "two"])
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([names.results])
                await asyncio.sleep(1.0)  # the deletion reaches the producer's broker
                await produce_to(kafka_bootstrap, names.input, 0, ["three", "four"])
                detail = ""
                for _ in range(120):  # the watch looks every 10 s
                    ready, detail = connector._ready()
                    if not ready and names.results in detail:
                        break
                    await asyncio.sleep(0.25)
            finally:  # back in any case, so the drain at the end does not wait for it
                await admin.create_topics([NewTopic(names.results, 1, 1)])
                await admin.close()
            assert names.results in detail, detail
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
            for _ in range(40):
                if connector._ready()[0]:
                    break
                await asyncio.sleep(0.25)
            assert connector._ready()[0], connector._ready()
        out = await results(kafka_bootstrap, names.results)
        assert Counter(r["eventId"] for r in out) == Counter(["three", "four"])
