"""Poison pills on a real broker (issue 9): no record can block a commit cycle.

A record whose dead letter (or result) is over the producer's ``max_request_size`` used to
abort every commit cycle, restart the session and replay the cycle for ever. Each test here
puts such records among valid events and checks that every event gets its outcome, every
offset is committed, no thread is created twice, and the session never restarted.
"""

from __future__ import annotations

import asyncio
import hashlib
from urllib.parse import quote

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from connector.app import Connector
from connector.simulator import ThreadsApiSimulator
from tests.harness import (
    Names,
    event,
    make_settings,
    read_all,
    results,
    running,
    simulator_fixture,
    wait_until_committed,
)
from tests.kafka_helpers import create_topics, raw_header

pytestmark = pytest.mark.integration
BIG_TOPIC_BYTES = 8 * 1024 * 1024  # input topics that accept what a careless producer sends
LIMIT = 1_048_576


sim = simulator_fixture(seed=3)


async def big_input(bootstrap: str, names: Names, partitions: int = 1) -> None:
    await create_topics(
        bootstrap,
        {names.input: partitions},
        config={"max.message.bytes": str(BIG_TOPIC_BYTES)},
    )


async def produce_big(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=BIG_TOPIC_BYTES
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k, headers=headers) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def record_size(record: object) -> int:
    r = record
    size = 82 + len(r.key or b"") + len(r.value or b"")  # type: ignore[attr-defined]
    return size + sum(len(k) + len(v or b"") + 10 for k, v in r.headers)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_oversize_records_among_valid_events_block_nothing(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    names = Names.fresh(f"poison-{mode[:5]}")
    await big_input(kafka_bootstrap, names)
    link = "\u00e9" * 600_000  # the result's deepLink alone is 1.2 MB
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        delivery={"mode": mode},
        results={"deep_link_template": "https://x/${data.link}?t=${threadUid}"},
    )
    two_mb = b"\x00not json" + bytes(range(256)) * 8192  # 2 MB, not JSON
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(30):
        records.append((f"v-{i}".encode(), event(f"ok-{i}", data={"orderId": "A", "link": "l"})))
        if i == 10:
            records.append((b"poison-2mb", two_mb))
        if i == 20:
            huge_link = event("big-result", data={"orderId": "B", "link": link})
            records.append((b"poison-result", huge_link))
    async with running(settings) as connector:
        await produce_big(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=90)
        assert connector.sessions == 1  # never restarted
        bounded = connector.metrics.outcomes_bounded
        assert bounded.labels("dead_letter", "bounded")._value.get() == 1
        assert bounded.labels("result", "bounded")._value.get() == 1
    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == sorted(
        [f"ok-{i}" for i in range(30)] + ["big-result"]
    )
    assert sim.store.count_by_event_id() == {
        e: 1 for e in [*(f"ok-{i}" for i in range(30)), "big-result"]
    }
    (big,) = [r for r in out if r["eventId"] == "big-result"]
    assert big["threadUid"] in {t.thread_uid for t in sim.store.all()}
    # each value in the deep link is percent-encoded
    raw = f"https://x/{quote(link, safe='')}?t={quote(big['threadUid'], safe='')}".encode()
    assert big["truncated"]["deepLink"] == {
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    assert raw.decode().startswith(big["deepLink"])
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.key == b"poison-2mb"
    assert raw_header(dead, "dlq-code") == b"invalid_json"
    assert raw_header(dead, "dlq-value-bytes") == str(len(two_mb)).encode()
    assert raw_header(dead, "dlq-value-sha256") == hashlib.sha256(two_mb).hexdigest().encode()
    assert raw_header(dead, "dlq-value-cut") == b"truncated"
    assert raw_header(dead, "dlq-source") == f"{names.input}/0/11".encode()
    assert dead.value and two_mb.startswith(dead.value)
    assert record_size(dead) <= LIMIT


async def test_a_1048400_byte_value_is_dead_lettered_in_bounded_form(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """Fits the input topic (1 MiB default) but its dead letter, with the dlq-* headers,
    does not fit the producer's request."""
    names = Names.fresh("poison-1048400")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    value = b"{" + b"x" * 1_048_399  # not JSON
    records: list[tuple[bytes | None, bytes | None]] = [(b"a", event("a-1"))]
    records += [(b"poison", value), (b"b", event("b-1"))]
    async with running(settings) as connector:
        await produce_big(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert connector.sessions == 1
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == [
        "a-1",
        "b-1",
    ]
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert raw_header(dead, "dlq-value-bytes") == b"1048400"
    assert raw_header(dead, "dlq-value-sha256") == hashlib.sha256(value).hexdigest().encode()
    assert dead.value and value.startswith(dead.value)


async def test_omit_leaves_the_value_out(kafka_bootstrap: str, sim: ThreadsApiSimulator) -> None:
    names = Names.fresh("poison-omit")
    await big_input(kafka_bootstrap, names)
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=1, kafka={"oversize_value": "omit"}
    )
    value = b"<" * 1_500_000
    async with running(settings) as connector:
        await produce_big(kafka_bootstrap, names.input, [(b"p", value), (b"g", event("g-1"))])
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert connector.sessions == 1
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.value == b""
    assert raw_header(dead, "dlq-value-cut") == b"omitted"
    assert raw_header(dead, "dlq-value-bytes") == b"1500000"
    assert [r["eventId"] for r in await results(kafka_bootstrap, names.results)] == ["g-1"]


async def test_huge_original_headers_are_dropped_and_counted(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("poison-hdr")
    await big_input(kafka_bootstrap, names)
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    headers = [("trace", b"\xff\xfebinary"), ("blob", b"h" * 1_200_000)]
    async with running(settings) as connector:
        await produce_big(kafka_bootstrap, names.input, [(b"p", b"not json")], headers=headers)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert connector.sessions == 1
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.value == b"not json"
    assert raw_header(dead, "trace") == b"\xff\xfebinary"  # the producer's bytes, as they are
    assert raw_header(dead, "blob") is None
    assert raw_header(dead, "dlq-headers-dropped") == b"1"


async def test_dlq_reason_cut_keeps_utf8_valid(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("poison-utf8")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    # "no route for event type '" is 25 bytes: byte 1,000 falls inside an "é"
    body = orjson.dumps({"id": "u-1", "type": "\u00e9" * 700, "user": {"id": "u"}})
    async with running(settings):
        await produce_big(kafka_bootstrap, names.input, [(b"k", body)])
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    reason = raw_header(dead, "dlq-reason") or b""
    assert 990 <= len(reason) <= 1000
    assert reason.decode("utf-8").startswith("no route for event type '\u00e9\u00e9")
    for name, value in dead.headers:
        if name.startswith("dlq-"):
            value.decode("utf-8")  # every one of the connector's headers is valid


async def test_startup_waits_not_ready_while_an_output_topic_refuses_large_records(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """The mismatch is named (setting, topic, both numbers) on /readyz and in the log, the
    process stays up (no crash loop), and fixing the topic lets it start by itself."""
    names = Names.fresh("poison-cfg")
    await create_topics(kafka_bootstrap, {names.dead: 1}, config={"max.message.bytes": "500000"})
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=1, kafka={"retry_max_s": 1.0}
    )
    connector = Connector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while connector.kafka_problem is None:
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "no problem reported"
            await asyncio.sleep(0.1)
        ok, detail = connector._ready()
        assert not ok
        assert "kafka.max_request_size" in detail and names.dead in detail
        assert "1048576" in detail and "500000" in detail
        assert not connector.started.is_set()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            resource = ConfigResource(
                ConfigResourceType.TOPIC, names.dead, configs={"max.message.bytes": "2000000"}
            )
            await admin.alter_configs([resource])
        finally:
            await admin.close()
        await asyncio.wait_for(connector.started.wait(), 30)
        assert connector.kafka_problem is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_topics_the_connector_creates_accept_its_largest_record(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("poison-2m")
    await big_input(kafka_bootstrap, names)
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=1, kafka={"max_request_size": 3_000_000}
    )
    value = b"!" * 2_500_000  # fits the raised limit: dead-lettered whole
    async with running(settings) as connector:
        await produce_big(kafka_bootstrap, names.input, [(b"p", value)])
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert connector.sessions == 1
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert dead.value == value and raw_header(dead, "dlq-value-cut") is None
