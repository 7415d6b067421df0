"""What the connector creates, and the dedup changelog's configuration as a contract, on a
real broker.

Before: ``create_topics: true`` created input topics too (a typo'd topic was created and
consumed empty for ever, readiness green); the changelog was created even with
``create_topics: false``; a changelog with ``retention.ms=5000`` was accepted, emptied by
the broker, and a restart restored nothing (20 events replayed made 40 threads).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from connector.app import Connector
from connector.dedup import changelog_topic
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, launched, make_settings, produce, results, running, until
from tests.harness import wait_until_committed as committed
from tests.kafka_helpers import create_topics

pytestmark = pytest.mark.integration
TTL_MS = 3_600_000


async def topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


async def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        return {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()


async def alter(bootstrap: str, topic: str, config: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=config)])
    finally:
        await admin.close()


def not_ready_naming(connector: Connector, *words: str) -> Callable[[], bool]:
    def check() -> bool:
        ready, detail = connector._ready()
        return not ready and all(w in detail for w in words)

    return check


async def test_a_missing_input_topic_is_not_created_and_the_connector_waits_for_it(
    kafka_bootstrap: str,
) -> None:
    names = Names.fresh("noinput")
    async with ThreadsApiSimulator(SimulatorSettings(seed=21)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"create_input_topics": False, "retry_initial_s": 0.2, "retry_max_s": 0.5},
        )
        async with launched(settings) as connector:
            await until(
                not_ready_naming(connector, names.input, "create_input_topics"),
                30,
                "readiness never named the missing input topic",
            )
            assert connector._not_ready()[0] == "topic_missing"  # not_ready{reason}
            await asyncio.sleep(1.5)  # several attempts: none may create it
            assert not await topic_exists(kafka_bootstrap, names.input)
            assert not connector.started.is_set()

            await create_topics(kafka_bootstrap, {names.input: 1})
            await asyncio.wait_for(connector.started.wait(), 30)
            await produce(kafka_bootstrap, names.input, [(b"k", event("appeared"))])
            await committed(kafka_bootstrap, names.group, names.input)
        out = await results(kafka_bootstrap, names.results)
        assert [r["eventId"] for r in out] == ["appeared"]


async def test_no_changelog_is_created_when_create_topics_is_false(kafka_bootstrap: str) -> None:
    names = Names.fresh("nocreate")
    await create_topics(kafka_bootstrap, {names.input: 1, names.results: 1, names.dead: 1})
    async with ThreadsApiSimulator(SimulatorSettings(seed=22)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"create_topics": False, "retry_initial_s": 0.2, "retry_max_s": 0.5},
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        async with launched(settings) as connector:
            await until(
                not_ready_naming(connector, changelog, "cleanup.policy=compact,delete"),
                30,
                "readiness never named the missing changelog",
            )
            assert not await topic_exists(kafka_bootstrap, changelog)


async def test_a_short_retention_changelog_is_refused_when_topics_are_not_managed(
    kafka_bootstrap: str,
) -> None:
    names = Names.fresh("shortret")
    async with ThreadsApiSimulator(SimulatorSettings(seed=23)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"create_topics": False, "retry_initial_s": 0.2, "retry_max_s": 0.5},
            dedup={"ttl_s": TTL_MS / 1000},
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        await create_topics(kafka_bootstrap, {names.input: 1, names.results: 1, names.dead: 1})
        await create_topics(
            kafka_bootstrap,
            {changelog: 1},
            config={"cleanup.policy": "compact,delete", "retention.ms": "5000"},
        )
        async with launched(settings) as connector:
            await until(
                not_ready_naming(connector, changelog, "retention.ms=5000", f"{TTL_MS}"),
                30,
                "readiness never named the short retention",
            )
            assert connector._not_ready()[0] == "changelog"  # not_ready{reason}
            assert not connector.started.is_set()
            assert (await topic_config(kafka_bootstrap, changelog))["retention.ms"] == "5000"


async def test_a_breached_changelog_is_corrected_when_topics_are_managed(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Corrected with AlterConfigs, logged; the topic's other overrides are kept (an
    AlterConfigs request replaces them all)."""
    names = Names.fresh("fixret")
    async with ThreadsApiSimulator(SimulatorSettings(seed=24)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=1, dedup={"ttl_s": TTL_MS / 1000}
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        await create_topics(
            kafka_bootstrap,
            {changelog: 1},
            config={
                "cleanup.policy": "delete",
                "retention.ms": "5000",
                "retention.bytes": "100000",
                "segment.ms": "600000",
            },
        )
        caplog.set_level("WARNING", logger="connector.topics")
        async with running(settings):
            config = await topic_config(kafka_bootstrap, changelog)
        assert config["cleanup.policy"] == "compact,delete"
        assert config["retention.ms"] == str(TTL_MS)
        assert config["retention.bytes"] == "-1"
        assert config["segment.ms"] == "600000"
        lines = [r.getMessage() for r in caplog.records if "corrected dedup changelog" in r.message]
        assert len(lines) == 1, lines
        assert "retention.ms 5000 -> 3600000" in lines[0]


async def test_a_changelog_altered_while_running_turns_readiness_red(
    kafka_bootstrap: str,
) -> None:
    """The periodic check: an operator shortens the retention of a running group's
    changelog (create_topics false): readiness names it until it is put back."""
    names = Names.fresh("altered")
    async with ThreadsApiSimulator(SimulatorSettings(seed=25)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"create_topics": False},
            dedup={"ttl_s": TTL_MS / 1000, "changelog_check_interval_s": 0.5},
        )
        changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
        await create_topics(kafka_bootstrap, {names.input: 1, names.results: 1, names.dead: 1})
        await create_topics(
            kafka_bootstrap,
            {changelog: 1},
            config={"cleanup.policy": "compact,delete", "retention.ms": str(TTL_MS)},
        )
        async with running(settings) as connector:
            await produce(kafka_bootstrap, names.input, [(b"k", event("e1"))])
            await committed(kafka_bootstrap, names.group, names.input)
            await until(lambda: connector._ready()[0], 30, "never ready")
            await alter(
                kafka_bootstrap,
                changelog,
                {"cleanup.policy": "compact,delete", "retention.ms": "5000"},
            )
            await until(
                not_ready_naming(connector, changelog, "retention.ms=5000"),
                30,
                "readiness never named the altered changelog",
            )
            assert connector._not_ready()[0] == "changelog"
            await alter(
                kafka_bootstrap,
                changelog,
                {"cleanup.policy": "compact,delete", "retention.ms": str(TTL_MS)},
            )
            await until(lambda: connector._ready()[0], 30, "never ready again")
        out = await results(kafka_bootstrap, names.results)
        assert Counter(r["eventId"] for r in out) == Counter(["e1"])
