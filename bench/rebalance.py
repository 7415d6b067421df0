"""Rebalances: what a zombie, a scale-out, a scale-in and a rolling restart cost the group.

Starts a private local Kafka broker and the Threads API simulator at a fixed latency, then,
for each scenario, fresh topics (12 partitions) and ``connector run`` replicas (3) under a
steady load of events (a fixed rate, spread over the partitions). A consumer reads the
results topic with ``read_committed`` the whole time and stamps each result's arrival. Then:

- ``zombie``: one replica SIGSTOPped longer than the session timeout, then SIGCONT;
- ``scale-out``: a 4th replica starts;
- ``scale-in``: one replica gets SIGTERM;
- ``rolling``: one replica gets SIGTERM and is started again at once.

The replicas are StatefulSet-like: ``delivery.instance_id`` and ``kafka.group_instance_id``
``rb-<n>``, ``kafka.static_members`` 2 (the pods an autoscaler keeps: 0 and 1 are static;
2 and 3 join as dynamic members and leave the group when they stop). The scale-in and the
zombie act on replica 2, the rolling restart on replica 0.

Per scenario it prints duplicate results and lost events (the whole run, read_committed),
the largest gap between two results of one input partition in the window around the
event (median and max over the partitions), and the end-to-end p99 of the results that
arrived in that window (event produced -> result readable), against the steady state
before the event.

    python -m bench.rebalance [--scenarios zombie,scale-out,scale-in,rolling]
                              [--latency-ms 2000] [--zombie-latency-ms 1000] [--rate 36]

A benchmark, not a test: about 4 minutes; the figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.chaos import read_committed
from bench.common import (
    Simulator,
    Topics,
    connector_config,
    kafka_bootstrap,
    load_average,
    start_connector,
    stop_process,
)

PARTITIONS = 12
REPLICAS = 3
STATIC_MEMBERS = 2
SESSION_TIMEOUT_MS = 10_000
ZOMBIE_PAUSE_S = 25.0
WARMUP_S = 25.0
STEADY_S = 10.0  # the steady state: the last seconds before the event
WINDOW_S = 20.0  # observed after the event (the zombie: after SIGCONT)
BEFORE_S = 2.0  # and before it


@dataclass
class Run:
    """One scenario's group, replicas, and what arrived when."""

    name: str
    bootstrap: str
    base_url: str
    work: Path
    topics: Topics = field(default_factory=lambda: Topics(f"rb-{uuid.uuid4().hex[:8]}"))
    produced: dict[str, float] = field(default_factory=dict)  # event id -> time produced
    arrived: list[tuple[float, str]] = field(default_factory=list)  # (time, event id)
    static_members: int = STATIC_MEMBERS
    replicas: dict[int, Popen[bytes]] = field(default_factory=dict)
    starts: dict[int, int] = field(default_factory=dict)

    def config(self, index: int) -> dict[str, Any]:
        name = f"rb-{index}"
        return connector_config(
            self.bootstrap,
            self.base_url,
            self.topics,
            "exactly_once",
            kafka={
                "topic_partitions": PARTITIONS,
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                "heartbeat_interval_ms": 1_000,
                "group_instance_id": name,
                "static_members": self.static_members,
            },
            delivery={"instance_id": name, "drain_timeout_s": 15, "revoke_timeout_s": 15},
            api={"request_timeout_s": 10},
            logging={"level": "INFO", "format": "text"},
        )

    def start(self, index: int) -> None:
        self.starts[index] = self.starts.get(index, 0) + 1
        log = self.work / f"{self.name}-replica-{index}-{self.starts[index]}.log"
        self.replicas[index] = start_connector(self.config(index), log_path=str(log))

    def stop(self, index: int) -> None:
        proc = self.replicas.pop(index)
        stop_process(proc)


async def create_topics(bootstrap: str, topics: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, PARTITIONS, 1) for t in (topics.input, topics.results, topics.dlq)]
        )
    finally:
        await admin.close()


async def feed(run: Run, rate: float, stop: asyncio.Event) -> None:
    """Events at ``rate`` per second, round-robin over the partitions, until ``stop``."""
    producer = AIOKafkaProducer(bootstrap_servers=run.bootstrap, linger_ms=0)
    await producer.start()
    try:
        began, n = time.monotonic(), 0
        while not stop.is_set():
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            partition = n % PARTITIONS
            event_id = f"e-{partition}-{n}"
            run.produced[event_id] = time.time()
            value = orjson.dumps({"id": event_id, "type": "bench", "user": f"u-{n % 500}"})
            await producer.send(run.topics.input, value=value, partition=partition)
            n += 1
        await producer.flush()
    finally:
        await producer.stop()


async def watch(run: Run, stop: asyncio.Event) -> None:
    """Stamp every result as it becomes readable (read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=run.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(run.topics.results, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for messages in batch.values():
                for m in messages:
                    run.arrived.append((now, str(orjson.loads(m.value)["eventId"])))
    finally:
        await consumer.stop()


async def committed_all(run: Run, timeout_s: float) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=run.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=run.bootstrap)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(run.topics.input, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = await admin.list_consumer_group_offsets(run.topics.group)
            if all(tp in committed and committed[tp].offset >= ends[tp] for tp in tps):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{run.topics.group} did not commit all of its input")
    finally:
        await consumer.stop()
        await admin.close()


def _partition(event_id: str) -> int:
    return int(event_id.split("-")[1])


def gaps(run: Run, start: float, end: float) -> list[float]:
    """Per input partition: the longest time in [start, end] without a result of it."""
    out = []
    for p in range(PARTITIONS):
        times = sorted(t for t, e in run.arrived if _partition(e) == p and start <= t <= end)
        edges = [start, *times, end]
        out.append(max(b - a for a, b in itertools.pairwise(edges)))
    return out


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def latencies(run: Run, start: float, end: float) -> list[float]:
    first: dict[str, float] = {}
    for t, e in run.arrived:
        first.setdefault(e, t)
    return [t - run.produced[e] for e, t in first.items() if start <= t <= end]


async def scenario(name: str, run: Run, rate: float) -> dict[str, Any]:
    await create_topics(run.bootstrap, run.topics)
    stop_feed, stop_watch = asyncio.Event(), asyncio.Event()
    watcher = asyncio.create_task(watch(run, stop_watch))
    for index in range(REPLICAS):
        run.start(index)
    feeder = asyncio.create_task(feed(run, rate, stop_feed))
    try:
        await asyncio.sleep(WARMUP_S)
        event_at = time.time()
        if name == "zombie":
            victim = run.replicas[2]
            victim.send_signal(signal.SIGSTOP)
            await asyncio.sleep(ZOMBIE_PAUSE_S)
            victim.send_signal(signal.SIGCONT)
        elif name == "scale-out":
            run.start(3)
        elif name == "scale-in":
            await asyncio.to_thread(run.stop, 2)
        elif name == "rolling":
            await asyncio.to_thread(run.stop, 0)
            run.start(0)
        else:
            raise ValueError(name)
        window_end = time.time() + WINDOW_S
        await asyncio.sleep(WINDOW_S)
        stop_feed.set()
        await feeder
        await committed_all(run, 180)
        await asyncio.sleep(1)  # the last results reach the watcher
    finally:
        stop_feed.set()
        for index in list(run.replicas):
            await asyncio.to_thread(run.stop, index)
        stop_watch.set()
        await watcher
    out = await read_committed(run.bootstrap, run.topics.results)
    counts: dict[str, int] = {}
    for record in out:
        event_id = str(orjson.loads(record.value)["eventId"])
        counts[event_id] = counts.get(event_id, 0) + 1
    window_start = event_at - BEFORE_S
    around = gaps(run, window_start, window_end)
    steady = gaps(run, event_at - STEADY_S, event_at)
    return {
        "scenario": name,
        "events": len(run.produced),
        "duplicate_results": sum(c - 1 for c in counts.values()),
        "lost": len(set(run.produced) - set(counts)),
        "gap_median_s": round(statistics.median(around), 2),
        "gap_max_s": round(max(around), 2),
        "steady_gap_median_s": round(statistics.median(steady), 2),
        "e2e_p99_s": round(p99(latencies(run, event_at, window_end)), 2),
        "steady_e2e_p99_s": round(p99(latencies(run, event_at - STEADY_S, event_at)), 2),
    }


async def run_all(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    results = []
    with kafka_bootstrap() as bootstrap:
        for name in args.scenarios.split(","):
            latency = args.zombie_latency_ms if name == "zombie" else args.latency_ms
            with Simulator(latency_ms=latency) as sim:
                run = Run(name, bootstrap, sim.base_url, work, static_members=args.static_members)
                result = await scenario(name, run, args.rate)
            result["latency_ms"] = latency
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="zombie,scale-out,scale-in,rolling")
    parser.add_argument("--latency-ms", type=float, default=2000.0)
    parser.add_argument("--zombie-latency-ms", type=float, default=1000.0)
    parser.add_argument("--rate", type=float, default=36.0, help="events/s, all partitions")
    parser.add_argument(
        "--static-members",
        type=int,
        default=STATIC_MEMBERS,
        help="replicas below this ordinal are static members (0: none, as before issue 19)",
    )
    parser.add_argument("--keep", help="keep the replicas' logs in this directory")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rebalance-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average {load_average()}; logs in {work}", file=sys.stderr)
    asyncio.run(run_all(args, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
