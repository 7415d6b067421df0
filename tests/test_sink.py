"""The sink on a real broker: a record refused by the producer or the broker costs that
one outcome its full form, never the commit cycle (issue 9)."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from connector.apps import Apps
from connector.dedup import DedupWindow, MemoryDedupStore
from connector.errors import EventRejected, FencedError, Stage
from connector.events import InputRecord, OutRecord, dead_letter_record
from connector.kafka_common import client_kwargs
from connector.metrics import Metrics
from connector.pipeline import Pipeline
from connector.routing import Router
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.sink import CommitError, Sink
from connector.source import Source
from tests.harness import Names, ensure_topics, event, make_settings, read_all
from tests.kafka_helpers import create_topics

pytestmark = pytest.mark.integration


async def _nothing(_: object) -> None:
    return None


async def until_member(source: Source, timeout_s: float = 30) -> None:
    """Until the source's consumer has joined its group and been assigned."""
    deadline = time.monotonic() + timeout_s
    while source.member() is None:
        assert time.monotonic() < deadline, "the consumer never joined its group"
        await asyncio.sleep(0.05)


def header(record: object, name: str) -> bytes | None:
    return dict(record.headers).get(name)  # type: ignore[attr-defined]


async def group_offsets(bootstrap: str, group: str) -> dict[Any, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_consumer_group_offsets(group)  # type: ignore[no-any-return]
    finally:
        await admin.close()


def dlq(topic: str, value: bytes, offset: int) -> OutRecord:
    record = InputRecord("in", 0, offset, b"k", value)
    return dead_letter_record(topic, record, EventRejected(Stage.PARSE, "bad", code="invalid_json"))


async def cycle(settings: object, records: list[OutRecord], *, limit: int | None = None) -> Sink:
    source = Source(settings, _nothing, _nothing)  # type: ignore[arg-type]
    sink = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    if limit is not None:
        sink.max_request_size = limit  # the pre-check lets it through: the producer refuses
    await sink.start()
    try:
        assert await sink.commit_cycle(records, dict) == {}
    finally:
        await sink.stop()
    return sink


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_a_record_the_producer_refuses_is_replaced_by_its_minimal_form(
    kafka_bootstrap: str, mode: str
) -> None:
    names = Names.fresh(f"sink-{mode[:5]}")
    await create_topics(kafka_bootstrap, {names.dead: 1, names.results: 1})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, delivery={"mode": mode})
    big = b"\x01" * 2_000_000
    source = {"topic": "in", "partition": 0, "offset": 6}
    huge = {
        "schemaVersion": 1,
        "threadUid": "t-9",
        "appUid": "app",
        "deepLink": "x" * 2_000_000,
        "source": source,
    }
    records = [
        OutRecord(names.results, b"u", b'{"eventId":"a"}'),
        dlq(names.dead, big, 5),
        OutRecord(names.results, b"u", orjson.dumps(huge)),
        OutRecord(names.results, b"u", b'{"eventId":"b"}'),
    ]
    sink = await cycle(settings, records, limit=10_000_000)
    assert sink.bounded == 2
    a, minimal, b = [m.value for m in await read_all(kafka_bootstrap, names.results)]
    assert (a, b) == (b'{"eventId":"a"}', b'{"eventId":"b"}')
    # the thread exists: its result is published, in minimal form
    assert orjson.loads(minimal) == {
        "schemaVersion": 1,
        "appUid": "app",
        "threadUid": "t-9",
        "source": source,
        "truncated": {"all": {"bytes": len(orjson.dumps(huge))}},
    }
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.value == b"" and header(dead, "dlq-source") == b"in/0/5"
    assert header(dead, "dlq-value-bytes") == b"2000000"
    assert b"MessageSizeTooLarge" in (header(dead, "dlq-produce-error") or b"")


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_a_record_the_broker_refuses_is_replaced_by_its_minimal_form(
    kafka_bootstrap: str, mode: str
) -> None:
    """The refusal comes back on the batch's future; the cycle goes on, and in a
    transaction the dead letter is not silently lost."""
    names = Names.fresh(f"sink-broker-{mode[:5]}")
    await create_topics(kafka_bootstrap, {names.results: 1})
    await create_topics(kafka_bootstrap, {names.dead: 1}, config={"max.message.bytes": "100000"})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, delivery={"mode": mode})
    records = [dlq(names.dead, b"\x02" * 300_000, 7), OutRecord(names.results, b"u", b"{}")]
    sink = await cycle(settings, records)
    (dead,) = await read_all(kafka_bootstrap, names.dead)  # not lost
    assert dead.value == b"" and header(dead, "dlq-value-bytes") == b"300000"
    assert [m.value for m in await read_all(kafka_bootstrap, names.results)] == [b"{}"]
    assert sink.bounded == 1


async def test_a_producer_fenced_mid_cycle_ends_the_session_as_a_fence(
    kafka_bootstrap: str,
) -> None:
    """A newer instance with the same transactional id fences this one while its batches
    are in flight: aiokafka's sender moves the producer to its fatal state and the next
    send raises IllegalOperation ("not in transaction"), which is not a KafkaError. The
    cycle must say FencedError (the session restarts with a new producer), never crash
    the replica with an unclassified error (seen in CI during a rebalance)."""
    names = Names.fresh("sink-fenced")
    await create_topics(kafka_bootstrap, {names.results: 3, names.dead: 1})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names)
    source = Source(settings, _nothing, _nothing)  # type: ignore[arg-type]
    old = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    new = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    await old.start()
    try:
        await new.start()  # bumps the epoch: ``old`` is fenced
        try:
            records = [
                OutRecord(names.results, str(i).encode(), b"{}", partition=i % 3)
                for i in range(2_000)
            ]
            for _ in range(3):  # every cycle of a fenced producer says so
                with pytest.raises(FencedError):
                    await old.commit_cycle(records, dict)
        finally:
            await new.stop()
    finally:
        await old.stop()
    assert await read_all(kafka_bootstrap, names.results) == []


async def test_after_a_failed_commit_cycle_no_later_cycle_commits(kafka_bootstrap: str) -> None:
    """A failed cycle has already counted its outcomes done (``finish``) and they are
    gone. A revocation's cycle that failed (the broker down during a rebalance) used to
    be swallowed by the rebalance hook while the session went on: the next successful
    cycle committed positions past events that had no result (the chaos benchmark lost
    thousands of events that way). Now every later cycle of the pipeline refuses."""
    names = Names.fresh("failed-cycle")
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
        await ensure_topics(settings)
        metrics = Metrics()
        apps = Apps(settings, metrics)
        pipeline = Pipeline(
            settings,
            Router(settings.routes),
            MemoryDedupStore(DedupWindow(60, 1000)),
            apps,
            metrics,
        )
        source = Source(settings, _nothing, _nothing)
        fenced = Sink(settings, source, client_kwargs(settings))
        rival = Sink(settings, source, client_kwargs(settings))
        healthy = Sink(settings, source, client_kwargs(settings), transactional_suffix="-f1")
        async with AsyncExitStack() as stack:
            apps.start(stack)
            apps.apply_share(1, 1)
            for sink in (fenced, rival, healthy):  # rival fences ``fenced``
                await sink.start()
                stack.push_async_callback(sink.stop)
            async with asyncio.TaskGroup() as tasks:
                for offset in range(5):
                    record = InputRecord(names.input, 0, offset, b"k", event(f"fc-{offset}"))
                    pipeline.submit(record, tasks)
            with pytest.raises(FencedError):
                await pipeline.commit(fenced)
            with pytest.raises(CommitError):
                await pipeline.commit(healthy)
    assert await read_all(kafka_bootstrap, names.results) == []
    committed = await group_offsets(kafka_bootstrap, names.group)
    assert committed == {} or all(o.offset <= 0 for o in committed.values()), committed


async def test_a_refused_record_costs_a_retry_of_the_transaction_and_its_offsets_commit(
    kafka_bootstrap: str,
) -> None:
    """The positions go out beside the records (``send_offsets_to_transaction`` is not
    held until every record is acknowledged): ``finish`` marks the cycle's events done
    once, and after a broker refusal the retried transaction still commits them, with the
    refused record in its minimal form."""
    names = Names.fresh("sink-offsets")
    await create_topics(kafka_bootstrap, {names.input: 2, names.results: 2})
    await create_topics(kafka_bootstrap, {names.dead: 1}, config={"max.message.bytes": "100000"})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names)
    source = Source(settings, _nothing, _nothing)  # type: ignore[arg-type]
    sink = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    calls = []

    def finish() -> dict[tuple[str, int], int]:
        calls.append(1)
        return {(names.input, 0): 8, (names.input, 1): 3}

    records = [
        OutRecord(names.results, b"u", b'{"n":1}', partition=0),
        dlq(names.dead, b"\x02" * 300_000, 7),
        OutRecord(names.results, b"u", b'{"n":2}', partition=1),
    ]
    await sink.start()
    await source.start()  # offsets are committed as a member of the group (KIP-447)
    try:
        await until_member(source)
        positions = await sink.commit_cycle(records, finish)
    finally:
        await source.stop()
        await sink.stop()
    assert positions == {(names.input, 0): 8, (names.input, 1): 3}
    assert len(calls) == 1
    assert sink.bounded == 1
    assert sorted(m.value for m in await read_all(kafka_bootstrap, names.results)) == [
        b'{"n":1}',
        b'{"n":2}',
    ]
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.value == b"" and header(dead, "dlq-value-bytes") == b"300000"
    committed = await group_offsets(kafka_bootstrap, names.group)
    assert {(tp.topic, tp.partition): o.offset for tp, o in committed.items()} == positions


async def test_the_producer_batches_a_whole_cycle_without_lingering() -> None:
    """A cycle queues every record before it waits: no linger (it was 5 ms on every
    cycle), one batch per partition up to ``max_request_size`` (aiokafka's 16 KiB meant a
    round trip per 16 KiB per partition), and retries after
    ``kafka.producer_retry_backoff_ms`` (aiokafka's 100 ms held ~1 cycle in 70 for 100 ms:
    a transaction that follows another races the broker's commit markers)."""
    names = Names.fresh("sink-kwargs")
    settings = make_settings(
        "127.0.0.1:9", "http://127.0.0.1:1", names, kafka={"producer_retry_backoff_ms": 35}
    )
    source = Source(settings, _nothing, _nothing)  # type: ignore[arg-type]
    sink = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    producer = sink._producer
    assert producer._message_accumulator._linger_time == 0
    assert producer._message_accumulator._batch_size == settings.kafka.max_request_size
    assert producer._sender._retry_backoff == 0.035
    assert sink._producer_kwargs["retry_backoff_ms"] == 35


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_a_refused_batch_costs_only_the_record_the_broker_cannot_take(
    kafka_bootstrap: str, mode: str
) -> None:
    """The broker refuses a batch whole. A cycle's records for one partition share a
    batch, so the records beside the one too large for the topic go again one a batch and
    keep their full form; only the one refused on its own is cut."""
    names = Names.fresh(f"sink-batch-{mode[:5]}")
    await create_topics(kafka_bootstrap, {names.results: 1})
    await create_topics(kafka_bootstrap, {names.dead: 1}, config={"max.message.bytes": "100000"})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, delivery={"mode": mode})
    records = [
        dlq(names.dead, b"a" * 1_000, 1),
        dlq(names.dead, b"\x02" * 300_000, 2),
        dlq(names.dead, b"b" * 1_000, 3),
    ]
    sink = await cycle(settings, records)
    assert sink.bounded == 1
    dead = {header(m, "dlq-source"): m for m in await read_all(kafka_bootstrap, names.dead)}
    assert dead.keys() == {b"in/0/1", b"in/0/2", b"in/0/3"}
    assert dead[b"in/0/1"].value == b"a" * 1_000
    assert dead[b"in/0/3"].value == b"b" * 1_000
    assert dead[b"in/0/2"].value == b"" and header(dead[b"in/0/2"], "dlq-value-bytes") == b"300000"
    if mode == "exactly_once":  # the retried transaction keeps the cycle's order
        assert [header(m, "dlq-source") for m in await read_all(kafka_bootstrap, names.dead)] == [
            b"in/0/1",
            b"in/0/2",
            b"in/0/3",
        ]


async def test_keyed_records_land_where_kafkas_partitioner_puts_them_in_order(
    kafka_bootstrap: str,
) -> None:
    """The sink picks partitions itself: a user's results go where any Kafka client would
    put that key, in the cycle's order, also when a partition's records fill several
    batches (3 MB of records against a 1 MiB batch)."""
    names = Names.fresh("sink-keys")
    await create_topics(kafka_bootstrap, {names.results: 6, names.dead: 1})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names)
    pad = "x" * 30_000
    records = [
        OutRecord(names.results, f"user-{i % 40}".encode(), orjson.dumps({"n": i, "pad": pad}))
        for i in range(100)
    ]
    await cycle(settings, records)
    got = await read_all(kafka_bootstrap, names.results)
    deadline = asyncio.get_running_loop().time() + 30
    while len(got) < 100 and asyncio.get_running_loop().time() < deadline:
        # the broker writes the commit markers after it answers EndTxn: until then a
        # read_committed reader's end (the last stable offset) is behind on a partition
        await asyncio.sleep(0.2)
        got = await read_all(kafka_bootstrap, names.results)
    assert len(got) == 100
    default = DefaultPartitioner()
    partitions = list(range(6))
    for message in got:
        assert message.partition == default(message.key, partitions, partitions)
    for partition in partitions:
        numbers = [orjson.loads(m.value)["n"] for m in got if m.partition == partition]
        assert numbers == sorted(numbers)
    assert len({m.partition for m in got}) > 1


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_a_refused_full_batch_keeps_the_partitions_order(
    kafka_bootstrap: str, mode: str
) -> None:
    """One user's 40 results on one partition: the first batch (~1 MiB) is over the
    topic's max.message.bytes (500 kB), the second (~180 kB) is not. Without a transaction
    the second was written before the first's records went again (a hostile review)."""
    names = Names.fresh(f"rv-order-{mode[:5]}")
    await create_topics(kafka_bootstrap, {names.dead: 1})
    await create_topics(kafka_bootstrap, {names.results: 1}, config={"max.message.bytes": "500000"})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, delivery={"mode": mode})
    pad = "x" * 30_000
    records = [
        OutRecord(names.results, b"user-1", orjson.dumps({"n": i, "pad": pad})) for i in range(40)
    ]
    sink = await cycle(settings, records)
    got = [orjson.loads(m.value)["n"] for m in await read_all(kafka_bootstrap, names.results)]
    assert sink.bounded == 0
    assert got == list(range(40))


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
@pytest.mark.parametrize(
    ("case", "sizes", "limit"),
    [
        # the broker refuses the partition's first record: the others must not pass it
        ("first-refused", (300_000, 1_000, 1_000), None),
        # over the producer's own limit: replaced once, never lost (it was without a
        # transaction) nor tried for ever (a refused replacement looped in one)
        ("over-producer-limit", (60_000, 2_000_000, 60_000), 10_000_000),
    ],
)
async def test_a_cut_record_keeps_its_place_in_the_partition(
    kafka_bootstrap: str, mode: str, case: str, sizes: tuple[int, int, int], limit: int | None
) -> None:
    """Cases of a hostile review: the big record is cut to its minimal form, and the
    partition's records stay in the cycle's order."""
    names = Names.fresh(f"rv-{case[:5]}-{mode[:5]}")
    await create_topics(kafka_bootstrap, {names.results: 1})
    await create_topics(kafka_bootstrap, {names.dead: 1}, config={"max.message.bytes": "100000"})
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, delivery={"mode": mode})
    records = [dlq(names.dead, b"\x02" * size, n) for n, size in enumerate(sizes, start=1)]
    sink = await cycle(settings, records, limit=limit)
    order = [header(m, "dlq-source") for m in await read_all(kafka_bootstrap, names.dead)]
    assert sink.bounded == 1
    assert order == [b"in/0/1", b"in/0/2", b"in/0/3"]


async def test_the_producers_transaction_timeout_is_the_setting() -> None:
    """``kafka.transaction_timeout_ms`` bounds how long a frozen replica's open transaction
    holds its partitions' next owner (its committed-offset fetch waits for it)."""
    names = Names.fresh("sink-txn-timeout")
    settings = make_settings(
        "127.0.0.1:1", "http://127.0.0.1:1", names, kafka={"transaction_timeout_ms": 7_000}
    )
    source = Source(settings, _nothing, _nothing)  # type: ignore[arg-type]
    sink = Sink(settings, source, client_kwargs(settings))  # type: ignore[arg-type]
    assert sink._producer._txn_manager.transaction_timeout_ms == 7_000
