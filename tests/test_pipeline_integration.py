"""The connector end to end on a real Kafka broker, against the Threads API simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from connector.simulator import FaultSpec, LatencySpec, SimulatorSettings, ThreadsApiSimulator
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
    async with ThreadsApiSimulator(SimulatorSettings(seed=1)) as simulator:
        yield simulator


def header(record: object, name: str) -> str | None:
    for key, value in record.headers:  # type: ignore[attr-defined]
        if key == name:
            return value.decode()
    return None


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_distinct_events_become_threads_and_results(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    names = Names.fresh(mode)
    settings = make_settings(kafka_bootstrap, sim.base_url, names, delivery={"mode": mode})
    n = 60
    async with running(settings) as connector:
        await produce(
            kafka_bootstrap,
            names.input,
            [(f"u-{i % 7}".encode(), event(f"e-{i}", user=f"u-{i % 7}")) for i in range(n)],
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{connector.health.port}"
            assert (await http.get(f"{base}/healthz")).status_code == 200
            assert (await http.get(f"{base}/readyz")).status_code == 200
            metrics = (await http.get(f"{base}/metrics")).text
    assert "threads_connector_threads_created_total" in metrics

    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == sorted(f"e-{i}" for i in range(n))
    created = {t.thread_uid: t for t in sim.store.all()}
    assert all(r["threadUid"] in created for r in out)
    assert sim.store.count_by_event_id() == {f"e-{i}": 1 for i in range(n)}
    first = out[0]
    assert first["schemaVersion"] == 1 and first["appUid"] == "demo-app"
    assert first["deepLink"].endswith(first["threadUid"])
    assert set(first["source"]) == {"topic", "partition", "offset"}
    assert await read_all(kafka_bootstrap, names.dead) == []


async def test_duplicates_make_one_call(kafka_bootstrap: str, sim: ThreadsApiSimulator) -> None:
    names = Names.fresh("dup")
    sim.set_latency(LatencySpec(distribution="fixed", median_ms=300))
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=2)
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, [(b"u-1", event("seq-1"))])
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
        # sequential copy, then two copies in flight together
        await produce(
            kafka_bootstrap,
            names.input,
            [(b"u-1", event("seq-1")), (b"u-2", event("conc-1")), (b"u-2", event("conc-1"))],
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
        hits = connector.metrics.dedup_hits
        assert hits.labels(names.input, "window")._value.get() >= 1
        assert hits.labels(names.input, "in_flight")._value.get() >= 1
    assert sim.store.count_by_event_id() == {"seq-1": 1, "conc-1": 1}
    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == ["conc-1", "seq-1"]


async def test_bad_input_is_dead_lettered_with_reason(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("bad")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    bad = {
        "invalid_json": b'{"id": "x", "type": ',
        "not_an_object": b"[1, 2, 3]",
        "no_event_id": orjson.dumps({"type": "order.shipped", "user": {"id": "u"}}),
        "no_event_type": orjson.dumps({"id": "b-4", "user": {"id": "u"}}),
        "no_route": orjson.dumps({"id": "b-5", "type": "invoice.paid", "user": {"id": "u"}}),
        "invalid_request": event("b-6", user="has spaces!"),
        "invalid_request_long": event("b-7", user="x" * 101),
        "missing_field": orjson.dumps({"id": "b-8", "type": "order.shipped", "user": {"id": "u"}}),
        "empty_value": None,
    }
    good = event("g-1")
    records = [(f"k-{name}".encode(), value) for name, value in bad.items()] + [(b"k-good", good)]
    async with running(settings):
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    dead = await read_all(kafka_bootstrap, names.dead)
    by_key = {m.key.decode(): m for m in dead}
    assert set(by_key) == {f"k-{name}" for name in bad}
    for name, value in bad.items():
        record = by_key[f"k-{name}"]
        assert record.value == value, name  # the original bytes, untouched
        code = header(record, "dlq-code")
        assert code == name.removesuffix("_long"), (name, code)
        assert header(record, "dlq-reason")
        assert header(record, "dlq-stage") in {"parse", "validate", "route"}
        assert header(record, "dlq-source").startswith(f"{names.input}/0/")
    assert "A-Za-z0-9_-" in header(by_key["k-invalid_request"], "dlq-reason")
    assert "over 100" in header(by_key["k-invalid_request_long"], "dlq-reason")
    assert "data" in header(by_key["k-missing_field"], "dlq-reason")
    # no API call was spent on any of them
    assert sim.store.count_by_event_id() == {"g-1": 1}
    assert sim.store.response_counts() == {201: 1, 400: 1}  # and the start-up probe's 400


async def test_event_id_from_header_when_field_missing(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("hdr")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    body = orjson.dumps({"type": "order.shipped", "user": {"id": "u-9"}, "data": {"orderId": "1"}})
    async with running(settings):
        await produce(
            kafka_bootstrap, names.input, [(b"u-9", body)], headers=[("event-id", b"h-1")]
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    assert [r["eventId"] for r in await results(kafka_bootstrap, names.results)] == ["h-1"]


async def test_api_failures_storm_loses_nothing(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("storm")
    sim.set_faults(
        FaultSpec(
            error_rate_503=0.3, error_rate_502=0.1, timeout_rate=0.05, hang_s=2.0, retry_after_s=1
        )
    )
    sim.set_rate_limit(60, 10)
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        api={"max_attempts": 4, "request_timeout_s": 1.0, "rate_limit_per_s": 200},
    )
    n = 80
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, [(b"k", event(f"s-{i}")) for i in range(n)])
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
        m = connector.metrics
        retries = sum(
            s.value for s in m.api_retries.collect()[0].samples if s.name.endswith("_total")
        )
        unknown = m.api_outcome_unknown._value.get()
    ok = {r["eventId"] for r in await results(kafka_bootstrap, names.results)}
    dead = await read_all(kafka_bootstrap, names.dead)
    dead_ids = {header(d, "dlq-event-id") for d in dead}
    assert ok | dead_ids == {f"s-{i}" for i in range(n)}  # every event has an outcome
    assert not ok & dead_ids
    assert retries > 0
    for record in dead:
        assert header(record, "dlq-stage") == "api"
        assert header(record, "dlq-code") == "retries_exhausted"
        assert int(header(record, "dlq-attempts") or 0) in (0, 4)
    # the only duplicates we accept: calls whose outcome was unknown (timeouts)
    extra = sum(c - 1 for c in sim.store.count_by_event_id().values())
    assert extra <= unknown


async def test_unknown_agent_is_dead_lettered_with_status(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """Among successes of its app (a lone 4xx before any success waits for one:
    tests/test_systemic_integration.py)."""
    names = Names.fresh("404")
    nobody = {**make_route(), "event_type": "order.cancelled", "agent_uid": "agent-nobody"}
    routes = [make_route(), nobody]
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1, routes=routes)
    async with running(settings):
        records = [(b"k", event("n-0")), (b"k", event("n-1", type="order.cancelled"))]
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert header(dead, "dlq-http-status") == "404"
    assert header(dead, "dlq-code") == "http_404"


def make_route() -> dict[str, object]:
    from tests.harness import ROUTES

    return dict(ROUTES[0])


async def test_bad_api_key_pauses_without_dead_letters_then_recovers(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, tmp_path: Path
) -> None:
    names = Names.fresh("auth")
    key_file = tmp_path / "api-key"
    key_file.write_text("wrong-key")
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        api={
            "api_key": None,
            "api_key_file": key_file,
            "auth_probe_interval_s": 0.5,
            "secret_refresh_s": 0.2,
        },
    )
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, [(b"k", event(f"a-{i}")) for i in range(5)])
        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{connector.health.port}/readyz"
            for _ in range(150):
                ready = await http.get(url)
                if "401/403" in ready.json()["detail"]:
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503 and "401/403" in ready.json()["detail"]
        assert connector.metrics.auth_paused.labels("demo-app")._value.get() == 1
        assert sim.store.count_by_event_id() == {}
        key_file.write_text("demo-key")  # the secret is rotated
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=30)
        assert connector.metrics.auth_paused.labels("demo-app")._value.get() == 0
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(sim.store.count_by_event_id()) == [f"a-{i}" for i in range(5)]


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_restart_mid_stream_loses_nothing(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    names = Names.fresh(f"restart-{mode}")
    sim.set_latency(LatencySpec(distribution="uniform", min_ms=20, max_ms=120))
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        delivery={"mode": mode},
        api={"rate_limit_per_s": 100, "rate_limit_burst": 5},
    )
    n = 200
    await ensure_topics(settings)
    await produce(
        kafka_bootstrap, names.input, [(f"{i}".encode(), event(f"r-{i}")) for i in range(n)]
    )
    for _ in range(2):  # stop part-way through, twice
        async with running(settings) as connector:
            while connector.pipeline is None or connector.pipeline.stats.results < 40:
                await asyncio.sleep(0.05)
    async with running(settings):
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
    out = await results(kafka_bootstrap, names.results)
    ids = [r["eventId"] for r in out]
    assert set(ids) == {f"r-{i}" for i in range(n)}
    assert len(ids) == n  # no duplicate result records
    dupes = {e: c for e, c in sim.store.count_by_event_id().items() if c != 1}
    assert not dupes, [(t.event_id, t.created_at) for t in sim.store.all() if t.event_id in dupes]


async def test_key_ordering_keeps_calls_for_one_key_in_order(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("order")
    # random latency would reorder calls for one key if they were made concurrently
    sim.set_latency(LatencySpec(distribution="uniform", min_ms=5, max_ms=150))
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=2, delivery={"ordering": "key"}
    )
    keys = [f"user-{k}" for k in range(5)]
    records = [(key.encode(), event(f"{key}:{seq}", user=key)) for seq in range(12) for key in keys]
    async with running(settings):
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    by_key: dict[str, list[int]] = {}
    for thread in sorted(sim.store.all(), key=lambda t: t.created_at):
        key, seq = str(thread.event_id).split(":")
        by_key.setdefault(key, []).append(int(seq))
    assert by_key == {key: list(range(12)) for key in keys}


async def test_backpressure_pauses_fetching_and_resumes(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("bp")
    sim.set_latency(LatencySpec(distribution="fixed", median_ms=100))
    limit, fetch = 20, 10
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=2,
        delivery={"max_buffered_events": limit},
        kafka={"fetch_max_records": fetch},
        api={"rate_limit_per_s": 100, "max_in_flight": 8},
    )
    n = 200
    await ensure_topics(settings)
    await produce(kafka_bootstrap, names.input, [(b"k%d" % i, event(f"bp-{i}")) for i in range(n)])
    peak, paused_seen = 0, 0.0
    async with running(settings) as connector:
        done = asyncio.create_task(
            wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
        )
        while not done.done():
            if connector.pipeline is not None:
                peak = max(peak, connector.pipeline.in_progress())
            paused_seen = max(paused_seen, connector.metrics.partitions_paused._value.get())
            await asyncio.sleep(0.01)
        await done
    assert paused_seen >= 1  # fetching paused while the buffer was full
    assert peak <= limit + fetch  # bounded: at most one fetch beyond the limit
    assert len(await results(kafka_bootstrap, names.results)) == n  # and it resumed


async def test_events_compressed_by_their_producer_become_results(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """Producers compress with gzip, snappy, lz4 or zstd (Java's and librdkafka's common
    choices): without a codec library aiokafka raised UnsupportedCodecError on the fetch,
    and one lz4 batch stopped every partition of the replica, at every restart."""
    names = Names.fresh("codecs")
    settings = make_settings(kafka_bootstrap, sim.base_url, names)
    await ensure_topics(settings)
    codecs = ["gzip", "snappy", "lz4", "zstd"]
    for codec in codecs:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
        await producer.start()
        try:
            for i in range(5):
                await producer.send(names.input, event(f"{codec}-{i}", user=f"u-{i}"))
            await producer.flush()
        finally:
            await producer.stop()
    async with running(settings):
        await wait_until_committed(kafka_bootstrap, names.group, names.input)

    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == sorted(f"{c}-{i}" for c in codecs for i in range(5))
    assert await read_all(kafka_bootstrap, names.dead) == []
