"""Issue 9 on a real broker: dead letters once across restarts, typed event ids, bounded
duplicate exposure while commits fail, the buffer bound across rebalances."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest

from connector.app import Connector
from connector.events import InputRecord
from connector.localkafka import LocalKafka
from connector.session import Session
from connector.simulator import LatencySpec, SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    Names,
    ensure_topics,
    event,
    make_settings,
    produce,
    read_all,
    results,
    running,
    wait_until_committed,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def sim() -> ThreadsApiSimulator:
    async with ThreadsApiSimulator(SimulatorSettings(seed=9)) as simulator:
        yield simulator


def header(record: object, name: str) -> str | None:
    for key, value in record.headers:  # type: ignore[attr-defined]
        if key == name:
            return value.decode()
    return None


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_dead_letters_once_after_restarts_mid_run_and_redrive_still_processed(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    """Bad records finish before the valid events ahead of them, so their dead letters are
    written above the committed position; a stop part-way (SIGTERM: the drain cancels the
    jobs still waiting for a token) replays them. Each must reach the DLQ once."""
    names = Names.fresh(f"dl-{mode}")
    sim.set_latency(LatencySpec(distribution="uniform", min_ms=20, max_ms=120))
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=2,
        delivery={"mode": mode},
        api={"rate_limit_per_s": 60, "rate_limit_burst": 5},
    )
    n = 240
    records = [(f"{i}".encode(), b"{not json" if i % 3 == 0 else event(f"d-{i}")) for i in range(n)]
    bad = sum(1 for i in range(n) if i % 3 == 0)
    await ensure_topics(settings)
    await produce(kafka_bootstrap, names.input, records)
    for target in (30, 80):  # stop part-way through, twice
        async with running(settings) as connector:
            while connector.pipeline is None or connector.pipeline.stats.results < target // 2:
                await asyncio.sleep(0.05)
    async with running(settings):
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
    dead = await read_all(kafka_bootstrap, names.dead)
    sources = Counter(header(r, "dlq-source") for r in dead)
    twice = {s: c for s, c in sources.items() if c > 1}
    assert not twice, f"{len(twice)} of {len(sources)} dead letters written more than once"
    assert len(sources) == bad
    out = await results(kafka_bootstrap, names.results)
    assert len(out) == len({r["eventId"] for r in out}) == n - bad

    # a redriven copy (same value, new offset) is processed again: a new dead letter
    redrive = dead[:3]
    async with running(settings):
        await produce(
            kafka_bootstrap,
            names.input,
            [(r.key, r.value) for r in redrive],
            headers=[("dlq-redrive-count", b"1")],
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
    again = await read_all(kafka_bootstrap, names.dead)
    assert len(again) == bad + 3
    assert len({header(r, "dlq-source") for r in again}) == bad + 3


async def test_integer_and_string_ids_are_different_events_and_bad_ids_dead_letter(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("ids")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    body = orjson.loads(event("x"))
    values = [
        orjson.dumps({**body, "id": 5}),
        orjson.dumps({**body, "id": "5"}),
        orjson.dumps({**body, "id": 5}),  # a real duplicate of the first
        orjson.dumps({**body, "id": "x" * 10_000}),
        orjson.dumps({**body, "id": 5.0}),
        orjson.dumps({**body, "id": True}),
        orjson.dumps({**body, "id": None}),
        orjson.dumps({**body, "id": ""}),
    ]
    async with running(settings):
        await produce(kafka_bootstrap, names.input, [(b"u", v) for v in values])
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    assert sim.store.count_by_event_id() == {"5": 2}  # two threads: 5 and "5"
    out = await results(kafka_bootstrap, names.results)
    assert sorted((type(r["eventId"]).__name__, str(r["eventId"])) for r in out) == [
        ("int", "5"),
        ("str", "5"),
    ]
    dead = await read_all(kafka_bootstrap, names.dead)
    assert [(header(r, "dlq-stage"), header(r, "dlq-code")) for r in dead] == [
        ("validate", "invalid_event_id")
    ] * 5


async def test_header_id_with_bad_utf8_is_a_dead_letter(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("hdr")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    body = orjson.loads(event("x"))
    del body["id"]
    async with running(settings):
        await produce(
            kafka_bootstrap, names.input, [(b"u", orjson.dumps(body))], [("event-id", b"\xff\xfe")]
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    dead = await read_all(kafka_bootstrap, names.dead)
    assert [header(r, "dlq-code") for r in dead] == ["invalid_event_id"]
    assert sim.store.count_by_event_id() == {}


async def test_calls_stop_while_the_broker_is_down_and_exposure_stays_under_the_cap(
    private_kafka: LocalKafka, sim: ThreadsApiSimulator
) -> None:
    """Events flow, then the broker dies: nothing can commit, so the connector must stop
    starting calls (those on the wire finish). The threads created after the kill stay
    within ``delivery.max_uncommitted_threads``; once the broker is back every event gets
    exactly one result, and the duplicates stay within the cap too."""
    bootstrap = private_kafka.bootstrap_servers
    names = Names.fresh("gate")
    cap = 15
    sim.set_latency(LatencySpec(distribution="uniform", min_ms=30, max_ms=120))
    settings = make_settings(
        bootstrap,
        sim.base_url,
        names,
        partitions=2,
        delivery={"max_uncommitted_threads": cap, "commit_stall_s": 1.0},
        api={"rate_limit_per_s": 40, "rate_limit_burst": 5, "max_in_flight": 8},
    )
    n = 500
    await ensure_topics(settings)
    await produce(bootstrap, names.input, [(f"{i}".encode(), event(f"g-{i}")) for i in range(n)])
    async with running(settings) as connector:
        while len(sim.store.count_by_event_id()) < 60:
            await asyncio.sleep(0.05)
        private_kafka.kill_hard()
        at_kill = sum(sim.store.count_by_event_id().values())
        await asyncio.sleep(12)  # 480 calls' worth at the configured rate
        after = sum(sim.store.count_by_event_id().values())
        gate_closed = connector.metrics.registry.get_sample_value(
            "threads_connector_calls_gate_closed"
        )
        private_kafka.start()  # before asserting: a connector cannot drain without it
        assert after - at_kill <= cap, (after - at_kill, cap)
        assert gate_closed == 1
        await wait_until_committed(bootstrap, names.group, names.input, timeout_s=120)
    out = await results(bootstrap, names.results)
    assert Counter(r["eventId"] for r in out) == Counter(f"g-{i}" for i in range(n))
    twice = sum(c - 1 for c in sim.store.count_by_event_id().values())
    assert twice <= cap


def buffered(connector: Connector) -> int:
    """Events fetched and not finished, held ones of restoring partitions included."""
    return connector.session.buffered() if connector.session is not None else 0


async def test_buffer_bound_holds_at_every_moment_across_a_rebalance(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """Two replicas share a backlog; one leaves and the other is assigned its partitions,
    each with a big backlog (and a changelog to restore first). The survivor's buffered
    events stay within ``delivery.max_buffered_events`` throughout, fetches included."""
    names = Names.fresh("buf")
    sim.set_latency(LatencySpec(distribution="uniform", min_ms=20, max_ms=80))
    limit = 40
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=4,
        delivery={"max_buffered_events": limit},
        api={"rate_limit_per_s": 150, "rate_limit_burst": 10, "max_in_flight": 16},
    )
    n = 1600
    await ensure_topics(settings)
    await produce(
        kafka_bootstrap, names.input, [(f"{i}".encode(), event(f"b-{i}")) for i in range(n)]
    )
    peak = 0
    stop_sampling = asyncio.Event()

    async def sample(connector: Connector) -> None:
        nonlocal peak
        while not stop_sampling.is_set():
            peak = max(peak, buffered(connector))
            await asyncio.sleep(0.002)

    async with running(settings) as survivor:
        sampler = asyncio.create_task(sample(survivor))
        async with running(settings):
            while len(sim.store.count_by_event_id()) < 200:
                await asyncio.sleep(0.05)
        assert survivor.metrics.rebalances.labels("assign")._value.get() >= 2
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
        stop_sampling.set()
        await sampler
    assert len(sim.store.count_by_event_id()) == n
    assert 0 < peak <= limit, peak


async def test_a_new_session_starts_with_nothing_held_from_the_last_one(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """Records held for a restoring partition when a session ends (a fence, a failed
    restore: both restart the session) belong to the new consumer, which fetches them
    again from the committed offsets. Kept over, they were submitted at once and again
    when fetched: the offset tracker refused the second ('offset 39 is not after 39'),
    the replica crashed (seen in CI after a fence in the rebalance test)."""
    names = Names.fresh("held")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    await ensure_topics(settings)
    await produce(kafka_bootstrap, names.input, [(b"k", event(f"h-{i}")) for i in range(5)])
    connector = Connector(settings)
    # what a session ended during a restore leaves: the first record, fetched and held
    stale = InputRecord(names.input, 0, 0, b"k", event("h-0"))
    last = connector.session = Session(connector)
    last._held[(names.input, 0)] = [stale]
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)  # raises what ended the run
    assert connector.session is not last  # a fresh Session for each membership
    out = await results(bootstrap=kafka_bootstrap, topic=names.results)
    assert Counter(r["eventId"] for r in out) == Counter(f"h-{i}" for i in range(5))
