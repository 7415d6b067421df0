"""Three connector processes share one global rate limit: is the group held to it?

Starts the local Kafka broker (or uses ``KAFKA_BOOTSTRAP_SERVERS``), the Threads API
simulator with no rate limit of its own (it would accept far more), a large backlog of
events, and three ``connector run`` processes that join the group a few seconds apart.
From the simulator's record of when each thread was created it reports:

- the busiest 1-second window (every window that starts at a call), against L;
- the average rate while all three replicas run and the backlog is large, against L.

Target (DESIGN.md §5, issue 3): max window <= 1.02 x L, average >= 0.97 x L.

    python -m bench.ratelimit_group [--rate 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import yaml
from aiokafka import AIOKafkaProducer

from connector.config import ConnectorSettings
from connector.localkafka import LocalKafka
from connector.simulator import LatencySpec, SimulatorSettings, run_in_thread
from connector.topics import TopicManager

PARTITIONS = 6
REPLICAS = 3
LATENCY_MS = 0  # created_at is then the arrival time at the API


def settings_dict(bootstrap: str, base_url: str, tag: str, rate: float) -> dict[str, object]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{tag}-group",
            "input_topics": [f"{tag}-in"],
            "results_topic": f"{tag}-results",
            "dead_letter_topic": f"{tag}-dlq",
            "topic_partitions": PARTITIONS,
            "session_timeout_ms": 10_000,
        },
        "delivery": {"commit_interval_ms": 200},
        "api": {
            "base_url": base_url,
            "rate_limit_per_s": rate,
            "rate_limit_burst": 1,  # per replica: max(1, burst x share) = 1
            "max_in_flight": 256,
        },
        "routes": [
            {
                "event_type": "bench",
                "app_uid": "demo-app",
                "agent_uid": "agent-orders",
                "message_template": "Benchmark event ${id}",
                "user": {"field": "externalUserId", "path": "user"},
            }
        ],
        "server": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "WARNING", "format": "json"},
    }


async def produce_backlog(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i in range(count):
            value = orjson.dumps({"id": f"b-{i}", "type": "bench", "user": f"user-{i % 500}"})
            # round-robin partitions: every replica has the same backlog
            futures.append(
                await producer.send(
                    topic, value=value, key=str(i).encode(), partition=i % PARTITIONS
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def windows(times: list[float]) -> int:
    """The most calls in any 1-second window [t, t+1) that starts at a call."""
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="global limit L, calls/s")
    parser.add_argument("--seconds", type=float, default=40.0, help="backlog size in seconds")
    parser.add_argument("--stagger-s", type=float, default=3.0)
    args = parser.parse_args()

    kafka = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        kafka = LocalKafka()
        bootstrap = kafka.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim_settings = SimulatorSettings(
            latency=LatencySpec(distribution="fixed", median_ms=LATENCY_MS)
        )
        with run_in_thread(sim_settings) as sim, tempfile.TemporaryDirectory() as tmp:
            tag = f"bench-{uuid.uuid4().hex[:6]}"
            data = settings_dict(bootstrap, sim.base_url, tag, args.rate)
            env = {**os.environ, "THREADS_CONNECTOR_API__API_KEY": "demo-key"}
            os.environ["THREADS_CONNECTOR_API__API_KEY"] = "demo-key"
            settings = ConnectorSettings(**data)

            async def setup() -> None:
                async with TopicManager(settings) as topics:
                    await topics.ensure()
                await produce_backlog(bootstrap, f"{tag}-in", int(args.rate * args.seconds))

            asyncio.run(setup())
            config = Path(tmp) / "connector.yaml"
            config.write_text(yaml.safe_dump(data))
            joined_all = 0.0
            starts: list[float] = []
            for i in range(REPLICAS):
                starts.append(time.time())
                env_i = {**env, "THREADS_CONNECTOR_DELIVERY__INSTANCE_ID": f"{tag}-{i}"}
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "connector.cli", "run", "--config", str(config)],
                        env=env_i,
                        stderr=subprocess.DEVNULL,
                    )
                )
                if i < REPLICAS - 1:
                    time.sleep(args.stagger_s)
            joined_all = time.time() + 5.0  # time for the last rebalance to settle
            total = int(args.rate * args.seconds)
            deadline = time.time() + args.seconds * 4 + 60
            while len(sim.store.count_by_event_id()) < total and time.time() < deadline:
                time.sleep(0.5)
            created = sorted(t.created_at.timestamp() for t in sim.store.all())
            drained: dict[int, float] = {}  # partition -> time of its last call
            for t in sim.store.all():
                part = int(str(t.event_id).removeprefix("b-")) % PARTITIONS
                drained[part] = max(drained.get(part, 0.0), t.created_at.timestamp())
            per_event = sim.store.count_by_event_id()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        if kafka is not None:
            kafka.stop()

    # steady: all replicas joined, and every partition still has a backlog
    backlog_ends = min(drained.values()) if drained else 0.0
    steady = [t for t in created if joined_all <= t < backlog_ends]
    span = steady[-1] - steady[0] if len(steady) > 1 else 0.0
    average = (len(steady) - 1) / span if span > 0 else 0.0
    busiest = windows(created)
    steady_busiest = windows(steady)
    t0 = created[0] if created else 0.0
    per_second: dict[int, int] = {}
    for t in created:
        per_second[int(t - t0)] = per_second.get(int(t - t0), 0) + 1
    report = {
        "global_limit_per_s": args.rate,
        "replicas": REPLICAS,
        "partitions": PARTITIONS,
        "calls": len(created),
        "events": len(per_event),
        "threads_created_twice": sum(c - 1 for c in per_event.values()),
        "max_1s_window": busiest,
        "max_1s_window_over_L": round(busiest / args.rate, 4),
        "steady_max_1s_window_over_L": round(steady_busiest / args.rate, 4),
        "replica_starts_s": [round(s - t0, 1) for s in starts],
        "calls_per_second": [per_second.get(i, 0) for i in range(max(per_second, default=0) + 1)],
        "steady_average_per_s": round(average, 2),
        "steady_average_over_L": round(average / args.rate, 4),
        "steady_seconds": round(span, 1),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    ok = report["max_1s_window_over_L"] <= 1.02 and report["steady_average_over_L"] >= 0.97
    sys.stdout.write(f"target (max <= 1.02 L, average >= 0.97 L): {'met' if ok else 'NOT met'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
