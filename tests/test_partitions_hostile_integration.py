"""Hostile cases for undecodable records, skipped offsets and blocked partitions (issue 20
items 1, 6, 7), on a real broker: the situations the first tests did not meet."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as aiokafka_producer
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy as _BuilderPy

from connector.app import Connector
from connector.localkafka import run_tool
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.source import Source
from connector.undecodable import FetchGuard
from tests.harness import (
    Names,
    block_partition_0,
    ensure_topics,
    event,
    make_settings,
    produce,
    read_all,
    results,
    running,
    until,
    upstream_producer,
    wait_until_committed,
)
from tests.kafka_helpers import CONSUMER_GROUP_COMMAND
from tests.raw_batches import batch, send_raw
from tests.test_partition_progress_integration import committed_then_deleted

pytestmark = pytest.mark.integration


async def test_a_blocked_partition_is_named_while_a_backlog_elsewhere_fills_the_buffer(
    kafka_bootstrap: str,
) -> None:
    """Partition 0 behind an open upstream transaction, partition 1 with a backlog larger
    than the buffer and a slow API: the buffer fills, every partition is paused now and
    then, and the blocked partition must still be named after its time."""
    names = Names.fresh("blocked-busy")
    spec = SimulatorSettings(seed=3, latency={"distribution": "fixed", "median_ms": 300})
    async with ThreadsApiSimulator(spec) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            kafka={"blocked_partition_after_s": 3},
            delivery={"max_buffered_events": 20},
        )
        await ensure_topics(settings)
        async with upstream_producer(kafka_bootstrap, names) as upstream:
            await block_partition_0(upstream, names)
            backlog = [(b"k", event(f"p1-{i}")) for i in range(1500)]
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
            await producer.start()
            try:
                for _k, v in backlog:
                    await producer.send(names.input, v, partition=1)
                await producer.send_and_wait(names.input, event("p0-plain"), partition=0)
            finally:
                await producer.stop()
            async with running(settings) as connector:
                started = time.monotonic()

                def named() -> bool:
                    ready, why = connector._ready()
                    return not ready and f"{names.input}/0" in why and "blocked" in why

                await until(named, 25, "readiness never named the blocked partition")
                assert time.monotonic() - started >= 3
                # the backlog was still there: the buffer was full now and then
                assert sum(sim.store.count_by_event_id().values()) < 1500
                await upstream.abort_transaction()
                await until(lambda: connector._ready()[0], 20, "readiness stayed red")
                # green again while the backlog still fills the buffer
                assert sum(sim.store.count_by_event_id().values()) < 1500


BAD_NAME = b"\xff\xfe trace-\xc3(-id"  # not UTF-8


def undecodable_count(connector: Any, topic: str) -> Any:
    return connector.metrics.dead_letters.labels("parse", "undecodable_record", "", topic)


async def test_a_rebalance_during_the_recovery_loses_nothing_and_ends_nothing(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance that starts while the connector reads its partitions one by one past an
    undecodable record: the partitions it read before are another member's afterwards.
    The window is held open at the guard's first partition read (a real rebalance happens
    meanwhile); aiokafka itself holds a recovery's fetch until a rebalance has finished."""
    names = Names.fresh("undecodable-rebalance")
    entered, release = asyncio.Event(), asyncio.Event()
    original = FetchGuard._get

    async def held(self: FetchGuard, tp: TopicPartition, n: int, wait_s: float) -> Any:
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await original(self, tp, n, wait_s)

    monkeypatch.setattr(FetchGuard, "_get", held)
    async with ThreadsApiSimulator(SimulatorSettings(seed=4)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=4)
        await ensure_topics(settings)
        wanted: list[str] = []
        for p in range(4):
            records = [(f"p{p}-{i}".encode(), event(f"p{p}-{i}"), []) for i in range(5)]
            if p == 0:
                records.insert(2, (b"bad", event("bad"), [(BAD_NAME, b"v")]))
            wanted += [f"p{p}-{i}" for i in range(5)]
            await send_raw(kafka_bootstrap, TopicPartition(names.input, p), batch(records))
        async with running(settings) as connector:
            await asyncio.wait_for(entered.wait(), 30)
            assigns = connector.metrics.rebalances.labels("assign")
            before = assigns._value.get()
            other = AIOKafkaConsumer(
                names.input,
                bootstrap_servers=kafka_bootstrap,
                group_id=names.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            await other.start()
            try:
                await until(lambda: assigns._value.get() > before, 30, "no rebalance")
                await until(lambda: len(assigned(connector)) < 4, 30, "nothing moved")
                release.set()
                await asyncio.sleep(1.0)  # the recovery goes on: nothing to wait for
            finally:
                await other.stop()  # leaves: the connector takes every partition again
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
            assert connector.sessions == 1  # the session never ended
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
        (letter,) = await read_all(kafka_bootstrap, names.dead)
        assert letter.key == b"bad"


@pytest.mark.parametrize("pattern", ["consecutive", "interleaved"])
async def test_a_producer_writing_many_undecodable_records_costs_a_few_recoveries(
    kafka_bootstrap: str, pattern: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer that writes bad header names writes them on many records (a C or Go
    client can send any bytes): 150 of them, each its own batch, one after another or
    between good ones. Each became a recovery of its own (every partition read again,
    two WARNING lines): 300 lines and about 35 ms each."""
    names = Names.fresh(f"undecodable-{pattern[:5]}")
    n = 150
    async with ThreadsApiSimulator(SimulatorSettings(seed=6)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=2)
        await ensure_topics(settings)
        p0 = TopicPartition(names.input, 0)
        client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
        await client.bootstrap()
        wanted: list[str] = []
        try:
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(p0)
            for i in range(n):
                records = [(f"bad-{i}".encode(), event(f"bad-{i}"), [(BAD_NAME, b"v")])]
                if pattern == "interleaved":
                    records = [*records, (f"good-{i}".encode(), event(f"good-{i}"), [])]
                    wanted.append(f"good-{i}")
                for one in records:  # each record its own batch, as a producer with linger 0
                    request = ProduceRequest(None, -1, 30_000, [(p0.topic, [(0, batch([one]))])])
                    await client.send(leader, request)
        finally:
            await client.close()
        other = [(f"o{i}".encode(), event(f"other-{i}")) for i in range(50)]
        await produce(kafka_bootstrap, names.input, other)
        wanted += [f"other-{i}" for i in range(50)]
        caplog.set_level(logging.INFO, logger="connector")
        async with running(settings) as connector:
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
            dead = undecodable_count(connector, names.input)
            assert dead._value.get() == n
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
        lines = [r for r in caplog.records if r.name == "connector.undecodable" and r.levelno >= 30]
        assert len(lines) <= 10, f"{len(lines)} warnings for {n} undecodable records"


async def test_a_stopped_partition_goes_on_after_the_documented_operator_reset(
    kafka_bootstrap: str,
) -> None:
    """docs/partitions.md: stop the connector, reset the group's offset with
    kafka-consumer-groups to the log start readiness named, start again (still ``stop``):
    the partition goes on from there, nothing counted as skipped by the connector."""
    names = Names.fresh("skipstop-fix")
    async with ThreadsApiSimulator(SimulatorSettings(seed=8)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"offset_out_of_range": "stop"},
        )
        await ensure_topics(settings)
        await committed_then_deleted(kafka_bootstrap, names, settings)
        async with running(settings) as connector:

            def stopped() -> bool:
                ready, why = connector._ready()
                return not ready and "stopped" in why

            await until(stopped, 30, "readiness never named the stopped partition")
            why = connector._ready()[1]
        start = int(why.split("the log holds ")[1].split("-")[0])
        assert start == 30
        await asyncio.to_thread(
            run_tool,
            CONSUMER_GROUP_COMMAND,
            "--bootstrap-server", kafka_bootstrap, "--group", names.group,
            "--topic", f"{names.input}:0", "--reset-offsets", "--to-offset", str(start),
            "--execute", check=True,
        )  # fmt: skip
        async with running(settings) as connector:
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            assert connector._ready()[0], connector._ready()[1]
            skipped = connector.metrics.offsets_skipped.labels(names.input, "0")
            assert skipped._value.get() == 0
        wanted = [f"first-{i}" for i in range(10)] + [f"last-{i}" for i in range(5)]
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)


class _RawName(str):
    """A header name that encodes to bytes that are not UTF-8 (aiokafka's Python batch
    builder calls ``encode``): how a producer in another language can write one."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return BAD_NAME


@pytest.mark.parametrize("codec", [None, "gzip", "lz4", "zstd"])
async def test_undecodable_records_in_upstream_transactions_and_compressed_batches(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, codec: str | None
) -> None:
    """An upstream transactional producer (real control records) with compression: a bad
    record inside a committed transaction is one dead letter and its batch neighbours make
    their threads; one inside an aborted transaction makes nothing at all."""
    monkeypatch.setattr(message_accumulator, "DefaultRecordBatchBuilder", _BuilderPy)
    monkeypatch.setattr(aiokafka_producer, "DefaultRecordBatchBuilder", _BuilderPy)
    names = Names.fresh(f"undecodable-tx-{codec}")
    async with ThreadsApiSimulator(SimulatorSettings(seed=9)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
        await ensure_topics(settings)
        upstream = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=f"{names.group}-upstream",
            compression_type=codec,
            linger_ms=50,
        )
        await upstream.start()
        bad = [(_RawName("trace-id"), b"v")]
        try:
            for txn, end in (("t1", "commit"), ("t2", "abort"), ("t3", "commit")):
                async with upstream.transaction() if end == "commit" else _Aborting(upstream):
                    sent = [
                        await upstream.send(names.input, event(f"{txn}-a"), partition=0),
                        await upstream.send(
                            names.input, event(f"{txn}-bad"), key=b"bad", partition=0,
                            headers=bad,  # type: ignore[arg-type]
                        ),
                        await upstream.send(names.input, event(f"{txn}-b"), partition=0),
                    ]  # fmt: skip
                    await asyncio.gather(*sent)
        finally:
            await upstream.stop()
        monkeypatch.undo()
        async with running(settings) as connector:
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            assert connector.sessions == 1
        wanted = ["t1-a", "t1-b", "t3-a", "t3-b"]
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
        letters = await read_all(kafka_bootstrap, names.dead)
        assert sorted(m.value for m in letters) == sorted([event("t1-bad"), event("t3-bad")])
        codes = {v for m in letters for k, v in m.headers if k == "dlq-code"}
        assert codes == {b"undecodable_record"}


class _Aborting:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def __aenter__(self) -> None:
        await self._producer.begin_transaction()

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.abort_transaction()


async def test_a_rebalance_during_a_position_reset_ends_nothing(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas of a new group starting together: the first one is resetting a partition
    that has no committed offset (``connector.resets``) when the next one joins and the
    partition moves. The window is held open right after aiokafka's reset returned (it
    returns as soon as the assignment is gone); a real member joins meanwhile."""
    names = Names.fresh("reset-rebalance")
    entered, release = asyncio.Event(), asyncio.Event()
    original = AIOKafkaConsumer.seek_to_beginning

    async def held(self: AIOKafkaConsumer, *partitions: TopicPartition) -> bool:
        done = await original(self, *partitions)
        # the group consumer's reset of partition 0 (not the restore's), which moves: the
        # joining member's client id sorts first, and round robin gives it 0 and 2
        if self._group_id == names.group and partitions[0].partition == 0:
            entered.set()
            await release.wait()
        return bool(done)

    monkeypatch.setattr(AIOKafkaConsumer, "seek_to_beginning", held)
    async with ThreadsApiSimulator(SimulatorSettings(seed=10)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=4)
        await ensure_topics(settings)
        await produce(kafka_bootstrap, names.input, [(None, event(f"e-{i}")) for i in range(40)])
        async with running(settings) as connector:
            await asyncio.wait_for(entered.wait(), 30)
            other = AIOKafkaConsumer(
                names.input,
                bootstrap_servers=kafka_bootstrap,
                group_id=names.group,
                client_id="a-joiner",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await other.start()
            try:
                await until(lambda: len(assigned(connector)) < 4, 30, "nothing moved")
                assert (names.input, 0) not in assigned(connector)
                release.set()
                await asyncio.sleep(1.0)  # the reset goes on: nothing to wait for
            finally:
                await other.stop()
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
            assert connector.sessions == 1  # the session never ended
        assert sim.store.count_by_event_id() == {f"e-{i}": 1 for i in range(40)}


async def test_a_blocked_partition_is_named_across_rebalances_that_leave_it_here(
    kafka_bootstrap: str,
) -> None:
    """Rebalances more often than ``blocked_partition_after_s`` (a rolling restart, an
    autoscaler, a crash-looping member elsewhere in the group) while the partition stays
    with this replica: still blocked at the same LSO, so still named."""
    names = Names.fresh("blocked-rebalance")
    async with ThreadsApiSimulator(SimulatorSettings(seed=11)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            kafka={"blocked_partition_after_s": 4},
        )
        await ensure_topics(settings)
        async with (
            upstream_producer(kafka_bootstrap, names) as upstream,
            running(settings) as connector,
        ):
            await until(lambda: connector._ready()[0], 30, "never ready")
            await block_partition_0(upstream, names)
            await produce(kafka_bootstrap, names.input, [(None, event("later"))])
            assigns = connector.metrics.rebalances.labels("assign")
            named = False
            deadline = time.monotonic() + 20
            while not named and time.monotonic() < deadline:
                # a member of the group on another topic: a rebalance that leaves the
                # input partition here
                before = assigns._value.get()
                other = AIOKafkaConsumer(
                    names.results, bootstrap_servers=kafka_bootstrap, group_id=names.group
                )
                await other.start()
                await other.stop()
                await until(lambda b=before: assigns._value.get() > b, 30, "no rebalance")
                for _ in range(20):
                    ready, why = connector._ready()
                    named = named or (not ready and "blocked" in why)
                    await asyncio.sleep(0.1)
            assert named, "the blocked partition was never named"
            await upstream.abort_transaction()
            await until(lambda: connector._ready()[0], 20, "readiness stayed red")
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
        assert sim.store.count_by_event_id() == {"later": 1}


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_undecodable_records_amid_a_backlog_elsewhere_lose_and_repeat_nothing(
    kafka_bootstrap: str, mode: str
) -> None:
    """Bad records between good ones on partition 0 while partitions 1-3 hold a backlog that
    is in flight (a 20 ms API, a small buffer) during each recovery: each recovery seeks
    every partition back; every event must make its thread once, every offset be
    committed, in both delivery modes."""
    names = Names.fresh(f"undecodable-backlog-{mode[:5]}")
    spec = SimulatorSettings(seed=12, latency={"distribution": "fixed", "median_ms": 20})
    async with ThreadsApiSimulator(spec) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=4,
            delivery={"mode": mode, "max_buffered_events": 200},
        )
        await ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        wanted: list[str] = []
        try:
            for i in range(600):
                p = 1 + i % 3
                await producer.send(names.input, event(f"p{p}-{i}"), partition=p)
                wanted.append(f"p{p}-{i}")
            await producer.flush()
        finally:
            await producer.stop()
        p0 = TopicPartition(names.input, 0)
        for i in range(20):
            records = [(f"g{i}".encode(), event(f"p0-{i}"), [])]
            if i % 4 == 1:
                records.append((f"b{i}".encode(), event(f"bad-{i}"), [(BAD_NAME, b"v")]))
            await send_raw(kafka_bootstrap, p0, batch(records))
            wanted.append(f"p0-{i}")
        async with running(settings) as connector:
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
            dead = undecodable_count(connector, names.input)
            assert dead._value.get() == 5
            assert connector.sessions == 1
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
        got = [r["eventId"] for r in await results(kafka_bootstrap, names.results)]
        assert sorted(got) == sorted(wanted)  # one result each
        assert len(await read_all(kafka_bootstrap, names.dead)) == 5


async def test_a_blocked_partition_revoked_during_a_look_is_not_named_here_after(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gauge loop asks a blocked partition's position (an await) when a rebalance
    gives the partition to another member: what it saw must not name the partition as
    this replica's afterwards (readiness red for a partition it does not own)."""
    names = Names.fresh("blocked-moved")
    entered, release, armed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    original = Source.position

    async def held(self: Source, tp: Any, timeout_s: float = 2.0) -> int | None:
        value = await original(self, tp, timeout_s)
        if armed.is_set() and tp == (names.input, 0):
            entered.set()
            await release.wait()
        return value

    monkeypatch.setattr(Source, "position", held)
    async with ThreadsApiSimulator(SimulatorSettings(seed=13)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            kafka={"blocked_partition_after_s": 2},
        )
        await ensure_topics(settings)
        async with (
            upstream_producer(kafka_bootstrap, names) as upstream,
            running(settings) as connector,
        ):
            await until(lambda: connector._ready()[0], 30, "never ready")
            await block_partition_0(upstream, names)
            await produce(kafka_bootstrap, names.input, [(b"k", event("later"))])

            def named() -> bool:
                ready, why = connector._ready()
                return not ready and f"{names.input}/0" in why

            await until(named, 20, "never named")
            armed.set()
            await asyncio.wait_for(entered.wait(), 10)
            other = AIOKafkaConsumer(
                names.input,
                bootstrap_servers=kafka_bootstrap,
                group_id=names.group,
                client_id="a-joiner",  # sorts first: round robin gives it partition 0
                enable_auto_commit=False,
            )
            await other.start()
            try:
                await until(lambda: assigned(connector) == [(names.input, 1)], 30, "no move")
                release.set()
                await asyncio.sleep(3)  # a few gauge rounds
                assert not named(), connector._ready()[1]
            finally:
                await other.stop()
            await upstream.abort_transaction()


async def test_an_undecodable_record_behind_others_backlog_with_a_nearly_full_buffer(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A small room in each fetch (a buffer nearly full, a slow API) and a backlog on the
    partitions read first: a recovery that always started with the first partition spent
    its room there and never reached the bad record further on, so every fetch was a
    recovery (every partition sought back) until the backlog was gone: 11 for 1,500
    events, 31 for 4,500. It now starts where the last one ran out of room."""
    names = Names.fresh("undecodable-room")
    spec = SimulatorSettings(seed=14, latency={"distribution": "fixed", "median_ms": 50})
    async with ThreadsApiSimulator(spec) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=4,
            delivery={"max_buffered_events": 50},
        )
        await ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for i in range(1500):
                await producer.send(names.input, event(f"e{i}"), partition=i % 3)
            await producer.flush()
        finally:
            await producer.stop()
        p3 = TopicPartition(names.input, 3)
        for i in range(3):
            records = [(b"g", event(f"g{i}"), []), (b"b", event(f"b{i}"), [(BAD_NAME, b"v")])]
            await send_raw(kafka_bootstrap, p3, batch(records))
        caplog.set_level(logging.INFO, logger="connector")
        async with running(settings) as connector:
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
            dead = undecodable_count(connector, names.input)
            assert dead._value.get() == 3
        wanted = [f"e{i}" for i in range(1500)] + [f"g{i}" for i in range(3)]
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
        recoveries = [r for r in caplog.records if "one by one" in r.getMessage()]
        assert len(recoveries) <= 5, f"{len(recoveries)} recoveries"


def assigned(connector: Connector) -> list[tuple[str, int]]:
    """The partitions the connector's current session holds (none between sessions)."""
    session = connector.session
    return list(session.assigned) if session is not None else []
