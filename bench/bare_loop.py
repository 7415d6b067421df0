"""The floor the connector is compared with: a bare aiokafka + aiohttp loop.

No validation, routing, dedup, retries, metrics or logs: fetch, POST each event to the
Threads API (at most 256 at a time), produce one result record, and commit each
partition's contiguous done offsets every 250 ms (manual commits, at-least-once). Run by
``bench/throughput.py`` as a process of its own; runs until SIGTERM.

    python -m bench.bare_loop BOOTSTRAP INPUT RESULTS GROUP BASE_URL [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord


class Offsets:
    """Per partition: offsets done, and the contiguous position to commit."""

    def __init__(self) -> None:
        self.next: dict[TopicPartition, int] = {}
        self.done: dict[TopicPartition, set[int]] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        self.next.setdefault(tp, offset)
        self.done.setdefault(tp, set())

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self.done[tp].add(offset)

    def positions(self) -> dict[TopicPartition, int]:
        moved = {}
        for tp, done in self.done.items():
            position = self.next[tp]
            while position in done:
                done.discard(position)
                position += 1
            if position != self.next[tp]:
                self.next[tp] = moved[tp] = position
        return moved


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(
        args.input,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await consumer.start()
    await producer.start()
    session = aiohttp.ClientSession(
        base_url=args.base_url, connector=aiohttp.TCPConnector(limit=args.concurrency)
    )
    url = "/api/v1/appuid/demo-app/threads"
    headers = {"x-api-key": "demo-key", "content-type": "application/json"}
    slots = asyncio.Semaphore(args.concurrency)
    offsets = Offsets()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = orjson.loads(record.value or b"{}")
            body = {
                "agentUid": "agent-orders",
                "message": f"Benchmark event {event['id']}",
                "externalUserId": event["user"],
            }
            async with session.post(
                url, data=orjson.dumps(body), headers={**headers, "x-event-id": event["id"]}
            ) as response:
                response.raise_for_status()
                created = orjson.loads(await response.read())
            result = {"eventId": event["id"], "threadUid": created.get("threadUid")}
            ack = await producer.send(args.results, orjson.dumps(result), key=record.key)
            await ack
            offsets.finish(TopicPartition(record.topic, record.partition), record.offset)
        finally:
            slots.release()

    async def committer() -> None:
        while True:
            await asyncio.sleep(0.25)
            positions = offsets.positions()
            if positions:
                await consumer.commit(positions)

    commits = asyncio.create_task(committer())
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    offsets.add(tp, record.offset)
                    await slots.acquire()
                    task = asyncio.create_task(handle(record))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
    finally:
        commits.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commits
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("bootstrap", "input", "results", "group", "base_url"):
        parser.add_argument(name)
    parser.add_argument("--concurrency", type=int, default=256)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
