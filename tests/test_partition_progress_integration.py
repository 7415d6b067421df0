"""Partitions that skip or cannot progress, on a real broker (issue 20, cases 6 and 7).

Case 6: records deleted past the committed offset (retention, delete-records) made a
restarted connector jump to the log start without a word at any level. Now a WARNING names
the partition and the offsets skipped, ``offsets_skipped_total`` counts them, and with
``kafka.offset_out_of_range: stop`` the partition stays where it is and readiness names it.

Case 7: a partition behind an upstream transaction left open processed nothing while
readiness stayed green. Now ``partition_blocked_seconds`` grows, and past
``kafka.blocked_partition_after_s`` readiness names the partition; both clear when the
transaction ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from connector.simulator import ThreadsApiSimulator
from tests.harness import (
    Names,
    block_partition_0,
    committed_and_end,
    ensure_topics,
    event,
    make_settings,
    produce,
    results,
    running,
    simulator_fixture,
    until,
    upstream_producer,
    wait_until_committed,
)

pytestmark = pytest.mark.integration


sim = simulator_fixture(seed=7)


def events(prefix: str, n: int) -> list[tuple[bytes | None, bytes | None]]:
    return [(b"k", event(f"{prefix}-{i}")) for i in range(n)]


async def delete_before(bootstrap: str, tp: TopicPartition, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(offset)}, timeout_ms=10_000)
    finally:
        await admin.close()


async def committed_then_deleted(bootstrap: str, names: Names, settings: object) -> None:
    """10 events processed and committed, then 20 more deleted before anyone read them,
    then 5 more: offsets 10-29 are gone past the committed offset 10."""
    async with running(settings):  # type: ignore[arg-type]
        await produce(bootstrap, names.input, events("first", 10))
        await wait_until_committed(bootstrap, names.group, names.input)
    await produce(bootstrap, names.input, events("deleted", 20))
    await delete_before(bootstrap, TopicPartition(names.input, 0), 30)
    await produce(bootstrap, names.input, events("last", 5))


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "connector.resets" and r.levelno == logging.WARNING
    ]


async def test_skipped_offsets_are_logged_and_counted(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names.fresh("skipped")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    await ensure_topics(settings)
    await committed_then_deleted(kafka_bootstrap, names, settings)
    caplog.set_level(logging.WARNING, logger="connector")
    async with running(settings) as connector:
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
        skipped = connector.metrics.offsets_skipped.labels(names.input, "0")._value.get()
        assert skipped == 20
        assert connector.sessions == 1
    (line,) = skip_warnings(caplog)
    assert f"{names.input}/0" in line and "20 offsets skipped" in line, line
    got = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert got == sorted([f"first-{i}" for i in range(10)] + [f"last-{i}" for i in range(5)])


async def test_stop_keeps_the_partition_and_readiness_names_it(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names.fresh("skipstop")
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        kafka={"offset_out_of_range": "stop"},
    )
    await ensure_topics(settings)
    await committed_then_deleted(kafka_bootstrap, names, settings)
    caplog.set_level(logging.WARNING, logger="connector")
    async with running(settings) as connector:

        def stopped() -> bool:
            ready, why = connector._ready()
            return not ready and f"{names.input}/0" in why and "stopped" in why

        await until(stopped, 30, "readiness never named the stopped partition")
        assert "offset 10 out of range" in connector._ready()[1]
        gauge = connector.metrics.partition_stopped.labels(names.input, "0")
        assert gauge._value.get() == 1
        await asyncio.sleep(1.0)  # a few fetch rounds: still one warning, nothing read
        assert len(skip_warnings(caplog)) == 1
    committed, _ends = await committed_and_end(kafka_bootstrap, names.group, names.input)
    assert committed == {0: 10}  # nothing skipped
    got = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert got == sorted(f"first-{i}" for i in range(10))


@pytest.mark.parametrize("end", ["abort", "commit"])
async def test_a_partition_behind_an_open_transaction_is_named_until_it_ends(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, end: str
) -> None:
    names = Names.fresh(f"blocked-{end}")
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=2,
        kafka={"blocked_partition_after_s": 3},
    )
    await ensure_topics(settings)
    async with upstream_producer(kafka_bootstrap, names) as upstream:
        async with running(settings) as connector:
            await until(lambda: connector._ready()[0], 30, "never ready")
            await block_partition_0(upstream, names)
            plain = [(b"k", event(f"later-{i}")) for i in range(10)]
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                for _key, value in plain:
                    await producer.send_and_wait(names.input, value, partition=0)
                await producer.send_and_wait(names.input, event("other-p"), partition=1)
            finally:
                await producer.stop()
            started = time.monotonic()
            blocked = connector.metrics.partition_blocked.labels(names.input, "0")

            def named() -> bool:
                ready, why = connector._ready()
                return not ready and f"{names.input}/0" in why and "blocked" in why

            await until(named, 20, "readiness never named the blocked partition")
            assert time.monotonic() - started >= 3  # not before the configured time
            assert blocked._value.get() >= 3
            assert f"{names.input}/1" not in connector._ready()[1]
            assert sim.store.count_by_event_id() == {"other-p": 1}  # the other goes on
            if end == "commit":
                await upstream.commit_transaction()
            else:
                await upstream.abort_transaction()
            await until(lambda: connector._ready()[0], 20, "readiness stayed red")
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            assert blocked._value.get() == 0
        wanted = [f"later-{i}" for i in range(10)] + ["other-p"]
        wanted += ["in-tx"] if end == "commit" else []
        assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
