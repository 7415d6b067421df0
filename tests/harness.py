"""Helpers for integration tests: build settings, run a connector in-process, read outputs."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from connector.app import Connector
from connector.config import ConnectorSettings
from connector.metrics import Metrics
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.topics import TopicManager

API_KEY = "demo-key"


def simulator_fixture(seed: int) -> Any:
    """A test module's ``sim`` fixture (``sim = simulator_fixture(seed=3)``): the Threads
    API simulator with that seed, one per test."""

    @pytest.fixture
    async def sim() -> AsyncIterator[ThreadsApiSimulator]:
        async with ThreadsApiSimulator(SimulatorSettings(seed=seed)) as simulator:
            yield simulator

    return sim


@dataclass
class Names:
    """Fresh topic and group names for one test."""

    input: str
    results: str
    dead: str
    group: str

    @classmethod
    def fresh(cls, prefix: str = "t") -> Names:
        tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return cls(f"{tag}-in", f"{tag}-results", f"{tag}-dlq", f"{tag}-group")


ROUTES: list[dict[str, Any]] = [
    {
        "event_type": "order.shipped",
        "app_uid": "demo-app",
        "agent_uid": "agent-orders",
        "message_type": "system",
        "message_template": "Order ${data.orderId} shipped. Secret-ish system text ${eventId}.",
        "user": {"field": "externalUserId", "path": "user.id"},
    }
]


def make_settings(
    bootstrap: str, base_url: str, names: Names, *, partitions: int = 3, **sections: Any
) -> ConnectorSettings:
    """Settings for a test; ``sections`` update the defaults section by section."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": names.group,
            "input_topics": [names.input],
            "results_topic": names.results,
            "dead_letter_topic": names.dead,
            "topic_partitions": partitions,
            "create_input_topics": True,  # tests produce to fresh topics
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 1_000,
        },
        "delivery": {
            "commit_interval_ms": 100,
            "instance_id": uuid.uuid4().hex[:8],
            "drain_timeout_s": 10,
            "revoke_timeout_s": 10,
        },
        "api": {
            "base_url": base_url,
            "api_key": API_KEY,
            "rate_limit_per_s": 500,
            "rate_limit_burst": 50,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "request_timeout_s": 5,
        },
        "routes": ROUTES,
        "server": {"host": "127.0.0.1", "port": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return ConnectorSettings(**data)


def event(event_id: str, user: str = "u-1", order: str = "A-1", **extra: Any) -> bytes:
    body = {
        "id": event_id,
        "type": "order.shipped",
        "user": {"id": user},
        "data": {"orderId": order},
    }
    body.update(extra)
    return orjson.dumps(body)


async def ensure_topics(settings: ConnectorSettings) -> None:
    """Create the connector's topics up front (for tests that produce before starting it)."""
    async with TopicManager(settings) as topics:
        await topics.ensure()


@contextlib.asynccontextmanager
async def running(
    settings: ConnectorSettings,
    metrics: Metrics | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Connector]:
    """A connector running in this process until the block ends (then drained).
    ``clock``: the dedup window's time, to stand for a process started later."""
    connector = Connector(settings, metrics, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    waiter = asyncio.ensure_future(connector.started.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    if waiter not in done:
        raise TimeoutError("connector did not start")
    try:
        yield connector
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def launched(
    settings: ConnectorSettings, stop_timeout_s: float = 30
) -> AsyncIterator[Connector]:
    """A connector whose ``run`` has begun, without waiting for it to start (for what holds
    start-up back); stopped when the block ends."""
    connector = Connector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        yield connector
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_timeout_s)


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` every 0.1 s; ``TimeoutError(what)`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def eventually(
    check: Callable[[], Awaitable[bool]],
    timeout_s: float = 30,
    what: str = "the condition never held",
) -> None:
    """Await ``check`` every 0.1 s until it holds; ``TimeoutError(what)`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def upstream_producer(bootstrap: str, names: Names) -> AsyncIterator[AIOKafkaProducer]:
    """A started transactional producer of another application, stopped when the block
    ends; with :func:`block_partition_0` it leaves a transaction open on the input."""
    upstream = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"{names.group}-upstream"
    )
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


async def block_partition_0(upstream: AIOKafkaProducer, names: Names) -> None:
    """Begin a transaction that writes event ``in-tx`` to input partition 0 and leave it
    open: a read_committed consumer reads nothing past it until it ends."""
    await upstream.begin_transaction()
    await upstream.send_and_wait(names.input, event("in-tx"), partition=0)


async def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k, headers=headers) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, *, committed: bool = True) -> list[Any]:
    """Every record of the topic up to its current end (read_committed by default)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(m for m in msgs if m.offset < ends[TopicPartition(m.topic, m.partition)])
        return out
    finally:
        await consumer.stop()


async def results(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.value) for m in await read_all(bootstrap, topic)]


async def committed_and_end(
    bootstrap: str, group: str, topic: str
) -> tuple[dict[int, int], dict[int, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
        return committed, ends
    finally:
        await admin.close()
        await consumer.stop()


async def wait_until_committed(
    bootstrap: str, group: str, topic: str, timeout_s: float = 60
) -> None:
    """Until the group's committed offsets equal the topic's end offsets."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed, ends = await committed_and_end(bootstrap, group, topic)
        if ends and all(committed.get(p, 0) >= end for p, end in ends.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"committed {committed} never reached end offsets {ends}")
        await asyncio.sleep(0.25)
