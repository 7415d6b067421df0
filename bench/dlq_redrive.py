"""How fast ``connector dlq inspect`` reads and ``redrive`` copies, on a local broker.

Writes N dead letters (as the connector writes them: original record plus ``dlq-*``
headers, half ``no_route``, a quarter ``http_422``, a quarter ``invalid_json``) to a
dead-letter topic of 3 partitions, then times an inspect, a redrive of everything
redrivable (batches of 500 copies a transaction), and a second redrive (copies nothing).

    python -m bench.dlq_redrive [--records 20000] [--bootstrap-servers HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import orjson
from aiokafka import AIOKafkaProducer

from connector.config import ConnectorSettings
from connector.dlq.inspect import inspect
from connector.dlq.plan import RedriveOptions
from connector.dlq.records import Filter
from connector.dlq.redrive import redrive
from connector.errors import EventRejected, Stage
from connector.events import InputRecord, dead_letter_record
from connector.localkafka import LocalKafka
from connector.topics import TopicManager

CODES = (
    (Stage.ROUTE, "no_route"),
    (Stage.ROUTE, "no_route"),
    (Stage.API, "http_422"),
    (Stage.PARSE, "invalid_json"),
)


async def fill(settings: ConnectorSettings, records: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i in range(records):
            stage, code = CODES[i % len(CODES)]
            body = orjson.dumps({"id": f"e-{i}", "type": "order.created", "user": {"id": "u"}})
            rec = InputRecord(settings.kafka.input_topics[0], i % 3, i, b"u-%d" % i, body)
            out = dead_letter_record(
                settings.kafka.dead_letter_topic, rec, EventRejected(stage, "why", code=code)
            )
            futures.append(
                await producer.send(out.topic, out.value, key=out.key, headers=list(out.headers))
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def run(bootstrap: str, records: int) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = ConnectorSettings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{tag}",
            "input_topics": [f"bench-{tag}-in"],
            "results_topic": f"bench-{tag}-results",
            "dead_letter_topic": f"bench-{tag}-dlq",
            "topic_partitions": 3,
            "create_input_topics": True,
        },
        dedup={"store": "memory"},
        api={"api_key": "unused"},
        routes=[
            {
                "event_type": "*",
                "app_uid": "a",
                "agent_uid": "g",
                "message_template": "m",
                "user": {"path": "user"},
            }
        ],
    )
    async with TopicManager(settings) as topics:
        await topics.ensure()
    await fill(settings, records)
    for name, step in (
        ("inspect", lambda: inspect(settings, Filter(), show=10)),
        ("redrive", lambda: redrive(settings, RedriveOptions())),
        ("redrive again", lambda: redrive(settings, RedriveOptions())),
    ):
        started = time.perf_counter()
        out = await step()
        took = time.perf_counter() - started
        copied = getattr(out, "copied", None)
        print(
            f"{name:>14}: {records} dead letters in {took:.2f} s ({records / took:,.0f}/s read)"
            + (f", {copied} copied ({copied / took:,.0f}/s)" if copied is not None else "")
            + (
                f", position forgot {out.forgotten_offsets} offsets"
                if getattr(out, "forgotten_offsets", 0)
                else ""
            )
        )


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    with LocalKafka() as kafka:
        yield kafka.bootstrap_servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--bootstrap-servers")
    args = parser.parse_args()
    with broker(args.bootstrap_servers) as bootstrap:
        asyncio.run(run(bootstrap, args.records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
