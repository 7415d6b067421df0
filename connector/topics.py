"""Topic set-up: create what is missing, check what exists (partitions, cleanup policy,
record size limits)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from connector.config import ConnectorSettings, DeliveryMode
from connector.dedup import changelog_topic
from connector.errors import TopicError
from connector.kafka_common import client_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


class TopicManager:
    """Creates and checks the connector's topics with an admin client."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self._settings = settings
        self._admin = AIOKafkaAdminClient(**client_kwargs(settings))

    async def __aenter__(self) -> TopicManager:
        try:
            await self._admin.start()
        except BaseException:  # refused, or cancelled by a stop: no connection left open
            await self._admin.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    async def partitions(self, topics: list[str]) -> dict[str, int]:
        """Partition counts of existing topics (missing topics are absent)."""
        described = await self._admin.describe_topics(topics)
        return {
            t["topic"]: len(t["partitions"])
            for t in described
            if t.get("error_code", 0) == 0 and t["partitions"]
        }

    async def ensure(self) -> dict[str, int]:
        """Create missing topics (when allowed); check changelogs; return input partitions."""
        s = self._settings
        k = s.kafka
        size = {"max.message.bytes": str(k.max_request_size)}
        wanted = [TopicSpec(t, k.topic_partitions, {}) for t in k.input_topics] + [
            TopicSpec(t, k.topic_partitions, size) for t in (k.results_topic, k.dead_letter_topic)
        ]
        await self._create_missing(wanted, allow=k.create_topics)
        inputs = await self.partitions(list(k.input_topics))
        missing = [t for t in k.input_topics if t not in inputs]
        if missing:
            raise TopicError(f"kafka.input_topics: topic(s) {', '.join(missing)} do not exist")
        outputs = [k.results_topic, k.dead_letter_topic]
        if s.dedup.store == "changelog":
            outputs += await self._ensure_changelogs(inputs)
        await self._check_record_limits(outputs)
        return inputs

    async def _check_record_limits(self, topics: list[str]) -> None:
        """Every output topic must accept the largest record the producer may send: a
        broker refusal comes back on a batch of a transaction, which it poisons."""
        limit = self._settings.kafka.max_request_size
        configs = await self._topic_configs(topics)
        for topic in topics:
            raw = configs.get(topic, {}).get("max.message.bytes")
            if raw is None:
                log.warning("cannot read max.message.bytes of topic %s; not checked", topic)
                continue
            if int(raw) < limit:
                raise TopicError(
                    f"kafka.max_request_size is {limit} bytes but topic {topic} has "
                    f"max.message.bytes={raw}: the broker would refuse records the connector "
                    f"may write. Raise the topic's max.message.bytes to at least {limit} or "
                    f"lower kafka.max_request_size to at most {raw}"
                )

    async def _ensure_changelogs(self, inputs: dict[str, int]) -> list[str]:
        s = self._settings
        if s.delivery.mode is not DeliveryMode.EXACTLY_ONCE:
            log.info("dedup changelog without transactions: written after results, not with them")
        retention_ms = str(int(s.dedup.ttl_s * 1000))
        specs = {
            changelog_topic(s.kafka.group_id, topic, s.dedup.changelog_suffix): TopicSpec(
                changelog_topic(s.kafka.group_id, topic, s.dedup.changelog_suffix),
                partitions,
                {
                    "cleanup.policy": "compact,delete",
                    "retention.ms": retention_ms,
                    "max.message.bytes": str(s.kafka.max_request_size),
                },
            )
            for topic, partitions in inputs.items()
        }
        await self._create_missing(list(specs.values()), allow=True)
        existing = await self.partitions(list(specs))
        short = {
            name: spec.partitions
            for name, spec in specs.items()
            if name in existing and existing[name] < spec.partitions
        }
        if short:
            # partitions were added to the input topic: its changelog's records name their
            # partition (not a key hash), so growing it keeps partition p's state in p
            await self._grow(short)
            existing = await self.partitions(list(specs))
        for name, spec in specs.items():
            if existing.get(name) != spec.partitions:
                raise TopicError(
                    f"dedup changelog {name} has {existing.get(name)} partitions but its input "
                    f"topic has {spec.partitions}: they must be co-partitioned (delete the "
                    f"changelog, or set dedup.changelog_suffix to start a new one)"
                )
        configs = await self._topic_configs(list(specs))
        for name, config in configs.items():
            policy = config.get("cleanup.policy", "")
            if "compact" not in policy.split(","):
                raise TopicError(
                    f"dedup changelog {name} has cleanup.policy={policy}; it must include 'compact'"
                )
        return list(specs)

    async def _grow(self, counts: dict[str, int]) -> None:
        response = await self._admin.create_partitions(
            {name: NewPartitions(count) for name, count in counts.items()}
        )
        for name, code, message in response.topic_errors:
            # 37 INVALID_PARTITIONS: another replica grew it first (re-checked by the caller)
            if code not in (0, 37):
                raise TopicError(f"dedup changelog {name}: cannot add partitions: {message}")
        log.warning("grew dedup changelogs to their input topics' partitions %s", counts)

    async def _create_missing(self, specs: list[TopicSpec], *, allow: bool) -> None:
        existing = await self.partitions([s.name for s in specs])
        todo = [s for s in specs if s.name not in existing]
        if not todo:
            return
        if not allow:
            names = ", ".join(s.name for s in todo)
            raise TopicError(f"kafka.create_topics is false and topic(s) {names} do not exist")
        rf = self._settings.kafka.replication_factor
        new = [NewTopic(s.name, s.partitions, rf, topic_configs=s.config) for s in todo]
        try:
            await self._admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass  # another replica created it at the same moment
        except KafkaError as exc:
            raise TopicError(f"cannot create topics {[s.name for s in todo]}: {exc}") from exc
        log.info("created topics %s", [s.name for s in todo])
        await self._wait_visible([s.name for s in todo])

    async def _wait_visible(self, names: list[str], timeout_s: float = 30.0) -> None:
        """A new topic's metadata reaches every broker a moment after creation."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            found = await self.partitions(names)
            if all(name in found for name in names):
                return
            if asyncio.get_running_loop().time() > deadline:
                missing = [n for n in names if n not in found]
                raise TopicError(f"topics {missing} were created but never became visible")
            await asyncio.sleep(0.1)

    async def _topic_configs(self, topics: list[str]) -> dict[str, dict[str, str]]:
        """Each topic's effective configuration (``describe_configs``)."""
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        responses = await self._admin.describe_configs(resources)
        configs: dict[str, dict[str, str]] = {}
        for response in responses:
            for resource in response.resources:
                _err, _msg, _type, name, entries = resource[:5]
                configs[name] = {entry[0]: entry[1] for entry in entries}
        return configs
