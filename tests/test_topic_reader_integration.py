"""connector.source.TopicReader on a real broker: every partition read at once, to its end.

The dedup restore reads a replica's changelog partitions with it on every assignment, and
a record it misses is a thread created twice; one it never finishes is a replica stuck.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import NodeNotReadyError

from connector.source import TopicReader
from tests.harness import Names, make_settings
from tests.kafka_helpers import create_topics, produce, unique_name

pytestmark = [pytest.mark.integration]


def reader_for(bootstrap: str) -> TopicReader:
    return TopicReader(make_settings(bootstrap, "http://127.0.0.1:9", Names.fresh("reader")))


async def test_reads_every_partition_to_its_end_each_in_offset_order(
    kafka_bootstrap: str,
) -> None:
    topic = unique_name("reader")
    await create_topics(kafka_bootstrap, {topic: 4})
    for partition, count in ((0, 30), (2, 5), (3, 1)):  # partition 1 stays empty
        records = [(f"k{partition}-{i}".encode(), f"v{i}".encode()) for i in range(count)]
        await produce(kafka_bootstrap, topic, records, partition=partition)
    reader = reader_for(kafka_bootstrap)
    read = [r async for r in reader.read([(topic, p) for p in range(4)])]
    again = [r async for r in reader.read([(topic, 2)])]  # the reader is reusable
    nothing = [r async for r in reader.read([])]

    by_partition: dict[int, list[bytes | None]] = {}
    for record in read:
        by_partition.setdefault(record.partition, []).append(record.value)
    assert by_partition == {
        0: [f"v{i}".encode() for i in range(30)],
        2: [f"v{i}".encode() for i in range(5)],
        3: [b"v0"],
    }
    for partition in (0, 2, 3):
        offsets = [r.offset for r in read if r.partition == partition]
        assert offsets == sorted(offsets)
    assert [r.value for r in again] == [f"v{i}".encode() for i in range(5)]
    assert nothing == []


async def test_an_open_transaction_holds_only_its_partition_and_only_for_the_settle_time(
    kafka_bootstrap: str,
) -> None:
    """A crashed producer's open transaction keeps the LSO below the high watermark: its
    partition ends ``settle_s`` after it was read up to the LSO, without the open
    transaction's records; the other partitions' committed records are all there."""
    topic = unique_name("reader-txn")
    await create_topics(kafka_bootstrap, {topic: 3})
    await produce(kafka_bootstrap, topic, [(b"a", b"committed-0")], partition=0)
    await produce(kafka_bootstrap, topic, [(b"b", b"committed-2")], partition=2)
    zombie = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("zombie")
    )
    await zombie.start()
    try:
        await zombie.begin_transaction()
        await zombie.send_and_wait(topic, b"open", key=b"c", partition=2)
        reader = reader_for(kafka_bootstrap)
        started = time.monotonic()
        read = [r async for r in reader.read([(topic, p) for p in range(3)], settle_s=1.0)]
        took = time.monotonic() - started
        await zombie.abort_transaction()
    finally:
        await zombie.stop()

    assert sorted((r.partition, r.value) for r in read) == [
        (0, b"committed-0"),
        (2, b"committed-2"),
    ]
    assert took >= 1.0  # it waited for the open transaction before giving up on it


async def test_a_read_whose_fetches_fail_raises_an_error_and_leaves_no_client(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fetch fails (the broker answers the rest): the read gives up with an error
    that says so. aiokafka's stop then raised a CancelledError out of a fetch task waiting
    out its backoff, before it closed the client: a connection and a task left each time,
    and the stray cancel ended the whole connector."""
    topic = unique_name("reader-nofetch")
    await create_topics(kafka_bootstrap, {topic: 3})
    send = AIOKafkaClient.send

    async def no_fetch(self: AIOKafkaClient, node_id: int, request: Any, **kw: Any) -> Any:
        if type(request).__name__.startswith("FetchRequest"):
            raise NodeNotReadyError("fetches refused by the test")
        return await send(self, node_id, request, **kw)

    monkeypatch.setattr(AIOKafkaClient, "send", no_fetch)
    consumers: list[AIOKafkaConsumer] = []
    init = AIOKafkaConsumer.__init__

    def tracked(self: AIOKafkaConsumer, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        consumers.append(self)

    monkeypatch.setattr(AIOKafkaConsumer, "__init__", tracked)
    reader = reader_for(kafka_bootstrap)
    outcomes = []
    for _ in range(15):  # without the fix the stray cancel came within the first few reads
        try:
            [r async for r in reader.read([(topic, p) for p in range(3)], settle_s=0.3)]
            outcomes.append("returned")
        except RuntimeError:
            outcomes.append("error")
    await asyncio.sleep(0.2)

    assert outcomes == ["error"] * 15
    assert len(consumers) == 15
    assert all(c._closed and c._client._sync_task is None for c in consumers)
