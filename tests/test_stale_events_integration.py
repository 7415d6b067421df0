"""Routes with ``max_event_age_s`` on a real broker: old events make no call and are
dead-lettered ``expired``; a redrive leaves them unless ``--code expired`` names them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from connector.dlq.plan import RedriveOptions
from connector.dlq.records import Filter
from connector.dlq.redrive import redrive
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, make_settings, running
from tests.kafka_helpers import header, wait_for_records

pytestmark = pytest.mark.integration

HOUR_S = 3600
ROUTES: list[dict[str, Any]] = [
    {  # the event says when it happened
        "event_type": "compliance.deadline",
        "app_uid": "demo-app",
        "agent_uid": "agent-orders",
        "message_template": "Your deadline ${data.due} is approaching.",
        "user": {"field": "externalUserId", "path": "user.id"},
        "max_event_age_s": HOUR_S,
        "event_time_field": "meta.occurredAt",
    },
    {  # the Kafka record's timestamp says it
        "event_type": "reminder",
        "app_uid": "demo-app",
        "agent_uid": "agent-orders",
        "message_template": "A reminder.",
        "user": {"field": "externalUserId", "path": "user.id"},
        "max_event_age_s": HOUR_S,
    },
]


def body(event_id: str, event_type: str, occurred: Any = None) -> bytes:
    out: dict[str, Any] = {
        "id": event_id,
        "type": event_type,
        "user": {"id": f"u-{event_id}"},
        "data": {"due": "Friday"},
    }
    if occurred is not None:
        out["meta"] = {"occurredAt": occurred}
    return orjson.dumps(out)


async def produce_at(bootstrap: str, topic: str, records: list[tuple[bytes, int | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=v, key=b"k", timestamp_ms=ts) for v, ts in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_old_events_expire_fresh_ones_become_threads(kafka_bootstrap: str) -> None:
    names = Names.fresh("stale")
    now = time.time()
    two_hours_ago_ms = int((now - 2 * HOUR_S) * 1000)
    async with ThreadsApiSimulator(SimulatorSettings(seed=5)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1, routes=ROUTES)
        async with running(settings) as connector:
            await produce_at(
                kafka_bootstrap,
                names.input,
                [
                    (body("old-iso", "compliance.deadline", "2020-01-01T00:00:00Z"), None),
                    (body("old-epoch", "compliance.deadline", int(now) - 2 * HOUR_S), None),
                    (body("fresh", "compliance.deadline", int(now * 1000) - 60_000), None),
                    (body("garbled", "compliance.deadline", "next tuesday"), None),
                    (body("old-record", "reminder"), two_hours_ago_ms),
                    (body("fresh-record", "reminder"), None),
                ],
            )
            results = await wait_for_records(kafka_bootstrap, names.results, 2)
            dead = await wait_for_records(kafka_bootstrap, names.dead, 4)
            counted = dead_letter_counts(connector)
            assert counted[("route", "expired")] == 3
            assert counted[("validate", "invalid_event_time")] == 1

        assert sorted(orjson.loads(r.value)["eventId"] for r in results) == [
            "fresh",
            "fresh-record",
        ]
        # no call for the stale or unreadable ones
        assert sim.store.count_by_event_id() == {"fresh": 1, "fresh-record": 1}
        codes = {
            header(d, "dlq-event-id"): (header(d, "dlq-stage"), header(d, "dlq-code")) for d in dead
        }
        assert codes == {
            "old-iso": ("route", "expired"),
            "old-epoch": ("route", "expired"),
            "old-record": ("route", "expired"),
            "garbled": ("validate", "invalid_event_time"),
        }

        # a redrive leaves expired events; named, they go back and are still too old
        default = await redrive(settings, RedriveOptions())
        assert default.copied == 0
        assert default.not_redrivable_codes == {"expired": 3, "invalid_event_time": 1}
        named = await redrive(settings, RedriveOptions(Filter(codes=frozenset({"expired"}))))
        assert named.copied == 3
        async with running(settings):
            dead = await wait_for_records(kafka_bootstrap, names.dead, 7)
        again = [d for d in dead if header(d, "dlq-redrive-count") == "1"]
        assert sorted(header(d, "dlq-event-id") or "" for d in again) == [
            "old-epoch",
            "old-iso",
            "old-record",  # the copy kept the original record's timestamp
        ]
        assert all(header(d, "dlq-code") == "expired" for d in again)
        assert sim.store.count_by_event_id() == {"fresh": 1, "fresh-record": 1}


def dead_letter_counts(connector: Any) -> dict[tuple[str, str], float]:
    """Dead letters by (stage, reason), summed over the app and topic labels."""
    counted: dict[tuple[str, str], float] = {}
    for family in connector.metrics.dead_letters.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["stage"], sample.labels["reason"])
                counted[key] = counted.get(key, 0.0) + sample.value
    return counted
