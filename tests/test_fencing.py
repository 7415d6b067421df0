"""KIP-447 on aiokafka (connector.fencing): a stale member's transactional offsets are refused
by the broker, and a committed-offset fetch waits for a pending transaction. Real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.producer.sender import Sender

from connector import fencing, kip447
from connector.fencing import StaleMemberError
from connector.kip447 import GroupMember
from tests.kafka_helpers import consume_all, create_topics, end_offsets, unique_name


def test_the_aiokafka_internals_reached_into_are_there() -> None:
    fencing._checked = False
    fencing.check_aiokafka()


def test_a_moved_internal_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fencing, "_checked", False)
    monkeypatch.delattr(Sender, "_do_txn_offset_commit")
    with pytest.raises(RuntimeError, match=r"Sender\._do_txn_offset_commit is gone"):
        fencing.check_aiokafka()


def test_the_requests_encode_as_the_flexible_versions() -> None:
    member = GroupMember(7, "m-1", None)
    request = kip447.txn_offset_commit_request(
        "tx", "g", 5, 1, member, {TopicPartition("t", 0): _offset(42)}
    ).prepare({28: (0, 5)})
    assert request.API_VERSION == 3 and request.FLEXIBLE_VERSION
    assert request.generation_id == 7 and request.member_id == "m-1"
    decoded = type(request).decode(request.encode())
    assert decoded.topics == [("t", [(0, 42, -1, "", {})], {})]
    fetch = kip447.offset_fetch_request("g", [TopicPartition("t", 1)]).prepare({9: (1, 9)})
    assert fetch.API_VERSION == 7 and fetch.require_stable is True


def test_a_broker_without_kip_447_is_refused_by_name() -> None:
    request = kip447.offset_fetch_request("g", [TopicPartition("t", 0)])
    with pytest.raises(Exception, match="KIP-447"):
        request.prepare({9: (1, 5)})


def _offset(value: int) -> Any:
    from aiokafka.structs import OffsetAndMetadata

    return OffsetAndMetadata(value, "")


@contextlib.asynccontextmanager
async def _member(bootstrap: str, group: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    fencing.require_stable(consumer)
    consumer.subscribe([topic])
    try:
        await asyncio.wait_for(_assigned(consumer), 30)
        yield consumer
    finally:
        await consumer.stop()


async def _assigned(consumer: AIOKafkaConsumer) -> None:
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)


def _who(consumer: AIOKafkaConsumer) -> GroupMember:
    c = consumer._coordinator
    return GroupMember(c.generation, c.member_id, None)


@contextlib.asynccontextmanager
async def _producer(bootstrap: str, member: GroupMember) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique_name("tx"))
    fencing.fence_producer(producer, lambda: member)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@pytest.mark.integration
async def test_a_stale_members_transaction_is_refused_and_aborted(kafka_bootstrap: str) -> None:
    topic, out, group = unique_name("in"), unique_name("out"), unique_name("g")
    await create_topics(kafka_bootstrap, {topic: 1, out: 1})
    tp = TopicPartition(topic, 0)
    async with _member(kafka_bootstrap, group, topic) as old:
        stale = _who(old)
    async with _member(kafka_bootstrap, group, topic) as new:  # the partition's new owner
        async with _producer(kafka_bootstrap, stale) as zombie:
            await zombie.begin_transaction()
            await zombie.send_and_wait(out, b"from the zombie")
            with pytest.raises(StaleMemberError, match=r"UNKNOWN_MEMBER_ID|ILLEGAL_GENERATION"):
                await zombie.send_offsets_to_transaction({tp: 5}, group)
            await zombie.abort_transaction()
        # the owner's goes through
        async with _producer(kafka_bootstrap, _who(new)) as owner, owner.transaction():
            await owner.send_and_wait(out, b"from the owner")
            await owner.send_offsets_to_transaction({tp: 3}, group)
        assert await new.committed(tp) == 3
    await _settled(kafka_bootstrap, out)
    values = [r.value for r in await consume_all(kafka_bootstrap, out)]
    assert values == [b"from the owner"]  # read_committed: the zombie's record was aborted


async def _settled(bootstrap: str, topic: str) -> None:
    """Until the last stable offset has caught up with the end (the markers are written)."""
    deadline = time.monotonic() + 30
    while await end_offsets(bootstrap, topic, isolation_level="read_committed") != (
        await end_offsets(bootstrap, topic)
    ):
        assert time.monotonic() < deadline, f"{topic}: a transaction is still open"
        await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_the_committed_offset_waits_for_a_pending_transaction(kafka_bootstrap: str) -> None:
    topic, group = unique_name("in"), unique_name("g")
    await create_topics(kafka_bootstrap, {topic: 1})
    tp = TopicPartition(topic, 0)
    async with (
        _member(kafka_bootstrap, group, topic) as owner,
        _producer(kafka_bootstrap, _who(owner)) as producer,
    ):
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 7}, group)
        # the offsets are written but the transaction is open: a plain fetch would answer
        # "no committed offset" (the zombie's next owner would start from there)
        fetch = asyncio.ensure_future(owner.committed(tp))
        done, _ = await asyncio.wait({fetch}, timeout=1.5)
        assert not done, f"answered {fetch.result()} while the transaction is open"
        await producer.commit_transaction()
        assert await asyncio.wait_for(fetch, 10) == 7
