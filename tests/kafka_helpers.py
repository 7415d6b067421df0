"""Kafka helpers for integration tests: names, topics, produce, read back, offsets.

Each helper opens its own short-lived aiokafka clients, so it works against any broker
(``KAFKA_BOOTSTRAP_SERVERS``, testcontainers, or ``connector.localkafka``). The
``tool_*`` helpers ask Kafka's own command-line tools instead of aiokafka: an independent
check of what the connector committed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

from connector.localkafka import run_tool

CONSUMER_GROUP_COMMAND = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
GET_OFFSET_SHELL = "org.apache.kafka.tools.GetOffsetShell"

KeyValue = tuple[bytes | None, bytes | None]


def unique_name(prefix: str = "t") -> str:
    """A fresh topic or group name: ``<prefix>-<10 hex chars>``."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    config: Mapping[str, str] | None = None,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> None:
    """Create ``{name: partitions}`` (``config`` applies to each) and wait until every
    partition has a leader in the broker's metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        new = [
            NewTopic(name, count, replication_factor, topic_configs=dict(config or {}))
            for name, count in topics.items()
        ]
        response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
        for topic, code, *message in response.topic_errors:
            if code:
                raise for_code(code)(f"creating {topic}: {message[0] if message else ''}")
        deadline = time.monotonic() + timeout_s
        while not _all_led(await admin.describe_topics(list(topics)), topics):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {sorted(topics)} have no leaders after {timeout_s}s")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def _all_led(described: list[dict[str, Any]], wanted: Mapping[str, int]) -> bool:
    seen = {
        t["topic"]: t
        for t in described
        if t["error_code"] == 0 and all(p["leader"] >= 0 for p in t["partitions"])
    }
    return all(name in seen and len(seen[name]["partitions"]) == n for name, n in wanted.items())


async def partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partition ids (raises the broker's error if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"]:
        raise for_code(described["error_code"])(f"describing {topic}")
    return sorted(p["partition"] for p in described["partitions"])


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[KeyValue],
    *,
    partition: int | None = None,
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Send ``(key, value)`` records (acks=all, in order) and return ``(partition, offset)``s."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, value=v, key=k, partition=partition, headers=list(headers or [])
            )
            for k, v in records
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    isolation_level: str = "read_committed",
    timeout_s: float = 30.0,
) -> list[Any]:
    """Every record from the beginning up to the end offsets as of the call.

    ``read_committed`` reads to the last stable offset and leaves out aborted records.
    Returns aiokafka ``ConsumerRecord``s, partition by partition in offset order.
    """
    tps = [TopicPartition(topic, p) for p in await partitions(bootstrap, topic)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        deadline = time.monotonic() + timeout_s
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if time.monotonic() > deadline:
                positions = {tp.partition: await consumer.position(tp) for tp in tps}
                raise TimeoutError(f"{topic}: read to {positions}, end offsets {ends}")
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                out[tp.partition].extend(m for m in messages if m.offset < ends[tp])
        return [m for p in sorted(out) for m in out[p]]
    finally:
        await consumer.stop()


async def end_offsets(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted"
) -> dict[int, int]:
    """``{partition: end offset}`` (the last stable offset under ``read_committed``)."""
    tps = [TopicPartition(topic, p) for p in await partitions(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation_level)
    await consumer.start()
    try:
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` on ``topic`` (partitions never
    committed are absent), as aiokafka's admin client reads them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                offsets = await admin.list_consumer_group_offsets(group)
                break
            except KafkaError as exc:  # coordinator not available / loading: retriable
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await admin.close()
    return {
        tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset >= 0
    }


async def wait_for_committed(
    bootstrap: str, group: str, topic: str, *, timeout_s: float = 60.0
) -> dict[int, int]:
    """Wait until ``group`` committed the topic's end offset on every partition."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed = await committed_offsets(bootstrap, group, topic)
        ends = await end_offsets(bootstrap, topic)
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            return committed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{group} committed {committed}; end offsets are {ends}")
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------- Kafka's own tools


def parse_group_describe(output: str, topic: str) -> dict[int, int]:
    """Committed offsets from ``ConsumerGroupCommand --describe`` output (``-`` = none)."""
    header: list[str] | None = None
    offsets: dict[int, int] = {}
    for line in output.splitlines():
        cols = line.split()
        if "CURRENT-OFFSET" in cols and "PARTITION" in cols:
            header = cols
            continue
        if header is None or len(cols) < len(header) - 3:  # consumer columns may be "-"
            continue
        row = dict(zip(header, cols, strict=False))
        if row.get("TOPIC") == topic and row.get("CURRENT-OFFSET", "-").isdigit():
            offsets[int(row["PARTITION"])] = int(row["CURRENT-OFFSET"])
    return offsets


async def tool_committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """``group``'s committed offsets on ``topic`` per Kafka's ConsumerGroupCommand."""
    proc = await asyncio.to_thread(
        run_tool,
        CONSUMER_GROUP_COMMAND,
        "--bootstrap-server", bootstrap, "--describe", "--offsets", "--group", group,
    )  # fmt: skip
    if proc.returncode != 0 and "does not exist" not in proc.stdout + proc.stderr:
        raise RuntimeError(f"ConsumerGroupCommand failed:\n{proc.stdout}\n{proc.stderr}")
    return parse_group_describe(proc.stdout, topic)


async def tool_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """``{partition: end offset}`` per Kafka's GetOffsetShell (latest offsets)."""
    proc = await asyncio.to_thread(
        run_tool, GET_OFFSET_SHELL, "--bootstrap-server", bootstrap, "--topic", topic, check=True
    )
    offsets: dict[int, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().rsplit(":", 2)
        if len(parts) == 3 and parts[0] == topic and parts[1].isdigit() and parts[2].isdigit():
            offsets[int(parts[1])] = int(parts[2])
    return offsets


async def wait_for_records(bootstrap: str, topic: str, n: int, timeout_s: float = 60) -> list[Any]:
    """The topic's records once there are ``n`` of them, or what is there at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await consume_all(bootstrap, topic)
        if len(records) >= n or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.3)


def raw_header(record: Any, name: str) -> bytes | None:
    """The record's first header ``name`` as sent; ``None`` when it has none."""
    for key, value in record.headers:
        if key == name:
            return value
    return None


def header(record: Any, name: str) -> str | None:
    """The record's last header ``name``, decoded; ``None`` when it has none."""
    found = [v.decode() for k, v in record.headers if k == name]
    return found[-1] if found else None
