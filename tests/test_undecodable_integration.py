"""Records the Kafka client cannot decode, on a real broker (issue 20, case 1).

A header name that is not UTF-8 (the broker accepts it) made aiokafka's parser raise inside
``getmany``: the connector exited about 0.3 s after it was assigned the partition, at every
restart, and the whole group made no thread. Now the record is a dead letter by its
coordinates, and every other record (of its batch, its partition and the others) makes its
thread once.
"""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from connector.simulator import ThreadsApiSimulator
from tests.harness import (
    Names,
    ensure_topics,
    event,
    make_settings,
    read_all,
    results,
    running,
    simulator_fixture,
    wait_until_committed,
)
from tests.kafka_helpers import raw_header
from tests.raw_batches import batch, send_raw

pytestmark = pytest.mark.integration
BAD_NAME = b"\xff\xfe trace-\xc3(-id"  # not UTF-8


sim = simulator_fixture(seed=5)


def good(prefix: str, n: int) -> list[tuple[bytes | None, bytes | None, list[tuple[bytes, bytes]]]]:
    return [(f"{prefix}-{i}".encode(), event(f"{prefix}-{i}"), []) for i in range(n)]


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
async def test_an_undecodable_record_is_a_dead_letter_and_nothing_else_waits(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str
) -> None:
    names = Names.fresh(f"undecodable-{mode[:5]}")
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=2, delivery={"mode": mode}
    )
    await ensure_topics(settings)
    p0, p1 = TopicPartition(names.input, 0), TopicPartition(names.input, 1)
    # partition 0: 5 good batches, one batch [good, bad, good], 5 good batches; the bad
    # record is at offset 6. Partition 1: 5 good. All there before the connector starts,
    # so the first fetch returns both partitions and the bad record together.
    for record in good("before", 5):
        await send_raw(kafka_bootstrap, p0, batch([record]))
    bad_value = event("bad-1")
    mixed = [
        (b"mid-a", event("mid-a"), []),
        (b"bad", bad_value, [(b"ok", b"1"), (BAD_NAME, b"v")]),
        (b"mid-b", event("mid-b"), []),
    ]
    await send_raw(kafka_bootstrap, p0, batch(mixed))
    for record in good("after", 5):
        await send_raw(kafka_bootstrap, p0, batch([record]))
    await send_raw(kafka_bootstrap, p1, batch(good("other", 5)))

    async with running(settings) as connector:
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert connector.sessions == 1  # never restarted, never exited
        dead = connector.metrics.dead_letters.labels("parse", "undecodable_record", "", names.input)
        assert dead._value.get() == 1

    wanted = [
        *(f"before-{i}" for i in range(5)),
        "mid-a",
        "mid-b",
        *(f"after-{i}" for i in range(5)),
        *(f"other-{i}" for i in range(5)),
    ]
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == sorted(
        wanted
    )
    assert sim.store.count_by_event_id() == dict.fromkeys(wanted, 1)
    (letter,) = await read_all(kafka_bootstrap, names.dead)
    assert raw_header(letter, "dlq-code") == b"undecodable_record"
    assert raw_header(letter, "dlq-stage") == b"parse"
    assert raw_header(letter, "dlq-source") == f"{names.input}/0/6".encode()
    assert b"not UTF-8" in (raw_header(letter, "dlq-reason") or b"")
    assert letter.key == b"bad"
    assert letter.value == bad_value
    assert raw_header(letter, "ok") == b"1"
    # the name's bytes, as backslash escapes (a header name must be text)
    assert raw_header(letter, BAD_NAME.decode("utf-8", "backslashreplace")) == b"v"
