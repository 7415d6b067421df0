"""``check-config --online``: the brokers, topics, permissions and API the settings point
at, checked without changing anything a running connector sees.

Kafka, in order (a failure skips what depends on it):

    brokers      one connection with the configured security (``kafka_common.diagnose``)
    topics       inputs exist; results, dead letters and dedup changelogs exist with a
                 sound configuration, or the broker accepts their creation (validate_only)
    group        FindCoordinator + DescribeGroups + OffsetFetch (Describe on the group)
    input read   a fetch from each input topic without a group (Read on the topic)
    transactions InitProducerId for ``<transactional_id_prefix>-check-config`` and
                 AddOffsetsToTxn + TxnOffsetCommit, then abort (Write on the transactional
                 id, Read on the group); exactly_once only

ACLs are not read (DescribeAcls needs rights an application rarely has): each operation is
tried, and an authorization error names the ACL that is missing. Topics are
described with auto-creation off, so a broker that auto-creates topics creates none here.

Then the API, for each app (``preflight_api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from connector.changelog_contract import breaches, creation_config
from connector.config import ConnectorSettings, DeliveryMode
from connector.dedup import changelog_topic
from connector.kafka_common import client_kwargs, describe_failure, diagnose
from connector.preflight import Check, Status
from connector.preflight_api import api_checks
from connector.registry import RegistryUnavailable, SchemaRegistry

log = logging.getLogger(__name__)
CHECK_SUFFIX = "check-config"
_TOPIC_AUTHORIZATION = 29


async def online_checks(settings: ConnectorSettings, timeout_s: float = 15.0) -> list[Check]:
    """Every online check; never raises for what it finds (each is a Check)."""
    checks = await kafka_checks(settings, timeout_s)
    checks += await api_checks(settings)  # after Kafka: its failures are the likelier
    checks += await registry_checks(settings)
    return checks


async def registry_checks(settings: ConnectorSettings) -> list[Check]:
    """The schema registry answers a request with the configured credentials and TLS."""
    url = settings.schema_registry.url
    if url is None:
        return []
    async with SchemaRegistry(settings.schema_registry) as registry:
        try:
            await registry.check()
        except RegistryUnavailable as exc:
            return [Check("registry", Status.FAIL, f"{url}: {exc}")]
    return [Check("registry", Status.OK, f"{url}: answers with these credentials")]


async def kafka_checks(
    settings: ConnectorSettings, timeout_s: float, *, check_suffix: str = CHECK_SUFFIX
) -> list[Check]:
    """``check_suffix``: the transactional id the transaction check uses, after the
    prefix (``run``'s start-up checks use one per host)."""
    k = settings.kafka
    problem = await diagnose(settings, timeout_s)
    if problem is not None:
        return [
            Check("kafka", Status.FAIL, f"kafka.bootstrap_servers {k.bootstrap_servers}: {problem}")
        ]
    checks = [
        Check(
            "kafka", Status.OK, f"brokers {k.bootstrap_servers} reachable ({k.security_protocol})"
        )
    ]
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
        topics = TopicChecks(settings, admin)
        steps: list[Callable[[], Awaitable[list[Check]]]] = [
            topics.run,
            lambda: group_check(settings, admin),
            lambda: read_check(settings, topics.inputs),
        ]
        if settings.delivery.mode is DeliveryMode.EXACTLY_ONCE:
            steps.append(lambda: transaction_check(settings, topics.inputs, check_suffix))
        for step in steps:
            async with asyncio.timeout(timeout_s):
                checks += await step()
    except (KafkaError, OSError, TimeoutError) as exc:
        checks.append(Check("kafka", Status.FAIL, _failure(exc)))
    finally:
        await admin.close()
    return checks


def _acl(operations: str, kind: str, name: str) -> str:
    return f"(missing ACL: {operations} on {kind} {name})"


def _acl_read(topic: str) -> str:
    return _acl("Read", "Topic", topic)


def _failure(exc: BaseException) -> str:
    return describe_failure(exc) or f"{type(exc).__name__}: {exc}"


class TopicChecks:
    """Inputs exist; outputs exist and are sound, or can be created."""

    def __init__(self, settings: ConnectorSettings, admin: AIOKafkaAdminClient) -> None:
        self._settings = settings
        self._admin = admin
        self.inputs: dict[str, int] = {}

    async def run(self) -> list[Check]:
        s, k = self._settings, self._settings.kafka
        described = await self._metadata(sorted(self._wanted()))
        partitions = {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}
        hidden = {t["topic"] for t in described if t["error_code"] == _TOPIC_AUTHORIZATION}
        checks = []
        for topic in k.input_topics:
            if topic in partitions:
                self.inputs[topic] = partitions[topic]
                checks.append(
                    Check(
                        "topics",
                        Status.OK,
                        f"input topic {topic} exists ({partitions[topic]} partitions)",
                    )
                )
            elif k.create_input_topics and topic not in hidden:
                checks.append(await self._creatable(topic, k.topic_partitions, {}))
            else:
                checks.append(Check("topics", Status.FAIL, _missing_input(topic, topic in hidden)))
        size = {"max.message.bytes": str(k.max_request_size)}
        outputs = {
            k.results_topic: (k.topic_partitions, size),
            k.dead_letter_topic: (k.topic_partitions, size),
        }
        changelogs: dict[str, tuple[int, dict[str, str]]] = {}
        if s.dedup.store == "changelog":
            for topic, count in self.inputs.items():
                name = changelog_topic(k.group_id, topic, s.dedup.changelog_suffix)
                changelogs[name] = (count, creation_config(s.dedup.ttl_s, k.max_request_size))
        present = [t for t in [*outputs, *changelogs] if t in partitions]
        configs = await self._configs(present) if present else {}
        for name, (count, config) in {**outputs, **changelogs}.items():
            if name in partitions:
                checks.append(
                    self._sound(name, partitions[name], configs.get(name, {}), changelogs.get(name))
                )
            elif k.create_topics:  # a changelog too: never created when false
                checks.append(await self._creatable(name, count, config))
            else:
                checks.append(
                    Check(
                        "topics",
                        Status.FAIL,
                        f"topic {name} does not exist and kafka.create_topics is false: create it",
                    )
                )
        return checks

    async def _metadata(self, topics: list[str]) -> list[dict[str, Any]]:
        """Each topic's metadata with its error code, asking the broker not to create
        missing topics (``describe_topics`` asks it to, where auto-creation is on)."""
        client = AIOKafkaClient(**client_kwargs(self._settings))
        try:
            await client.bootstrap()
            request = MetadataRequest(topics, allow_auto_topic_creation=False)
            response = await client.send(client.get_random_node(), request)
        finally:
            await client.close()
        described: list[dict[str, Any]] = response.to_object()["topics"]
        return described

    def _wanted(self) -> set[str]:
        k = self._settings.kafka
        return {*k.input_topics, k.results_topic, k.dead_letter_topic} | {
            changelog_topic(k.group_id, t, self._settings.dedup.changelog_suffix)
            for t in k.input_topics
        }

    def _sound(
        self,
        name: str,
        count: int,
        config: dict[str, str],
        changelog: tuple[int, dict[str, str]] | None,
    ) -> Check:
        limit = self._settings.kafka.max_request_size
        problems = []
        raw = config.get("max.message.bytes")
        if raw is not None and int(raw) < limit:
            problems.append(f"max.message.bytes={raw} is below kafka.max_request_size ({limit})")
        if changelog is not None:
            if count != changelog[0]:
                problems.append(
                    f"{count} partitions, its input topic has {changelog[0]} (they must be equal)"
                )
            found = breaches(name, config, self._settings.dedup.ttl_s)
            if found and self._settings.kafka.create_topics:
                fixes = ", ".join(f"{b.setting} {b.value} -> {b.wanted}" for b in found)
                note = f"; run will correct {fixes} (kafka.create_topics; AlterConfigs ACL)"
                if not problems:
                    return Check(
                        "topics", Status.OK, f"topic {name} exists ({count} partitions){note}"
                    )
                problems.append(note.lstrip("; "))
            else:
                problems += [f"{b.setting}={b.value} {b.why}" for b in found]
        if problems:
            return Check("topics", Status.FAIL, f"topic {name}: " + "; ".join(problems))
        return Check("topics", Status.OK, f"topic {name} exists ({count} partitions)")

    async def _creatable(self, name: str, count: int, config: dict[str, str]) -> Check:
        rf = self._settings.kafka.replication_factor
        response = await self._admin.create_topics(
            [NewTopic(name, count, rf, topic_configs=config)], validate_only=True
        )
        for _topic, code, *rest in response.topic_errors:
            if code:
                message = rest[0] if rest and rest[0] else for_code(code).__name__
                acl = (
                    " (missing ACL: Create on Topic " + name + " or on the Cluster)"
                    if code == _TOPIC_AUTHORIZATION or code == 31
                    else ""
                )
                return Check(
                    "topics",
                    Status.FAIL,
                    f"topic {name} does not exist and cannot be created: {message}{acl}",
                )
        return Check(
            "topics",
            Status.OK,
            f"topic {name} does not exist; run will create it "
            f"({count} partitions, replication {rf})",
        )

    async def _configs(self, topics: list[str]) -> dict[str, dict[str, str]]:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        configs: dict[str, dict[str, str]] = {}
        for response in await self._admin.describe_configs(resources):
            for resource in response.resources:
                _err, _msg, _type, name, entries = resource[:5]
                configs[name] = {entry[0]: entry[1] for entry in entries}
        return configs


def _missing_input(topic: str, hidden: bool) -> str:
    if hidden:
        return f"input topic {topic}: not authorized (missing ACL: Describe on Topic {topic})"
    return (
        f"input topic {topic} does not exist (kafka.input_topics): a typo, or create it "
        f"(run creates input topics only with kafka.create_input_topics: true)"
    )


async def group_check(settings: ConnectorSettings, admin: AIOKafkaAdminClient) -> list[Check]:
    group = settings.kafka.group_id
    refused = [
        Check(
            "group",
            Status.FAIL,
            f"group {group}: not authorized {_acl('Describe and Read', 'Group', group)}",
        )
    ]
    try:
        described = await admin.describe_consumer_groups([group])
        await admin.list_consumer_group_offsets(group)
    except GroupAuthorizationFailedError:
        return refused
    for response in described:
        for entry in response.groups:
            code, state = entry[0], entry[2]
            if code == GroupAuthorizationFailedError.errno:
                return refused
            return [
                Check("group", Status.OK, f"group {group}: described (state {state or 'none'})")
            ]
    return [Check("group", Status.OK, f"group {group}: described")]


async def read_check(settings: ConnectorSettings, inputs: dict[str, int]) -> list[Check]:
    """A fetch without a group from partition 0 of each input topic (Read on the topic)."""
    if not inputs:
        return []
    consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=None, enable_auto_commit=False)
    checks = []
    try:
        await consumer.start()
        for topic in inputs:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            try:
                await consumer.getmany(tp, timeout_ms=200)
                await consumer.position(tp)
            except TopicAuthorizationFailedError:
                checks.append(
                    Check(
                        "acl",
                        Status.FAIL,
                        f"input topic {topic}: not authorized to read {_acl_read(topic)}",
                    )
                )
            else:
                checks.append(Check("acl", Status.OK, f"input topic {topic}: readable"))
    finally:
        await consumer.stop()
    return checks


async def transaction_check(
    settings: ConnectorSettings, inputs: dict[str, int], suffix: str = CHECK_SUFFIX
) -> list[Check]:
    """InitProducerId, then offsets sent to a transaction that is aborted: nothing is
    committed, no record is written."""
    prefix, group = settings.delivery.transactional_id_prefix, settings.kafka.group_id
    transactional_id = f"{prefix}-{suffix}"
    denied = _acl("Read", "Group", group)
    producer = AIOKafkaProducer(**client_kwargs(settings), transactional_id=transactional_id)
    try:
        await producer.start()
    except TransactionalIdAuthorizationFailed:
        await producer.stop()
        return [
            Check(
                "acl",
                Status.FAIL,
                f"transactional id {transactional_id}: not authorized "
                f"{_acl('Write and Describe', 'TransactionalId (PREFIXED)', prefix)}",
            )
        ]
    checks = [Check("acl", Status.OK, f"transactional ids {prefix}-*: InitProducerId allowed")]
    try:
        if inputs:
            topic = next(iter(inputs))
            await producer.begin_transaction()
            try:
                await producer.send_offsets_to_transaction(
                    {TopicPartition(topic, 0): OffsetAndMetadata(0, "")}, group
                )
            except GroupAuthorizationFailedError:
                checks.append(
                    Check(
                        "acl",
                        Status.FAIL,
                        f"group {group}: a transaction cannot commit offsets {denied}",
                    )
                )
            except TopicAuthorizationFailedError:
                checks.append(
                    Check(
                        "acl",
                        Status.FAIL,
                        f"input topic {topic}: offsets cannot be committed {_acl_read(topic)}",
                    )
                )
            else:
                checks.append(
                    Check(
                        "acl",
                        Status.OK,
                        f"group {group}: offsets can be committed in a transaction",
                    )
                )
            finally:
                with contextlib.suppress(KafkaError):
                    await producer.abort_transaction()
    finally:
        await producer.stop()
    return checks
