"""Added latency at half of the maximum load (issue 11).

added = result record timestamp - event timestamp - the API call's latency (the result's
``latencyMs``): the time the connector itself adds between an event and its result
(fetch, queueing, the wait for a commit cycle). The result's timestamp is stamped when the
commit cycle sends it; ``visible`` is when a ``read_committed`` reader got it (after the
transaction committed), minus the event timestamp and ``latencyMs``.

One ``connector run`` process (``exactly_once``, default settings but for the rate limit),
the simulator in its own process at 0 ms latency. The maximum load is measured first
(``bench.throughput``'s steady rate, 10 % to 90 % of a backlog) unless ``--rate`` is given;
events are then produced at half of it, paced: ``--ramp-seconds`` (the step from idle to
the load, on topics made for the run; reported apart as ``ramp_*``), then ``--seconds``
measured as the steady state (``added_*``). ``all_p99_ms`` covers both. Target: steady
p99 <= 100 ms.

The input topic stamps records with the broker's append time, so ``in_kafka_*`` is the
added latency from the moment the event was in Kafka; ``added_*`` counts from the load
generator's own stamp, and ``to_broker_p99_ms`` is the way between the two.

``--warmup-rounds`` (default 1) run first and are reported apart (``warmup_runs``): the
local broker's JVM starts with the bench, and in its first minutes (the JIT still
compiling its hot paths) every first round was the slowest of its run, its p99 falling
second by second over 20 s (``--dump``); a production broker has run for days.

``--compare NAME=SRC`` runs the connector from another source tree too (e.g. an export of
the commit before a change), in alternating rounds, against the same load.

    python -m bench.latency [--rate R] [--seconds 30] [--ramp-seconds 5] [--rounds 1]
                            [--compare base=/tmp/x] [--dump /tmp/lat]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
import uuid
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer

from bench.common import (
    Progress,
    Simulator,
    Topics,
    connector_config,
    create_topics,
    kafka_bootstrap,
    load_average,
    produce,
    start_connector,
    stop_process,
    wait_committed,
)
from bench.throughput import connector_starter, run_one
from connector.localkafka.ports import free_ports

WARMUP = 60


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def collect(
    bootstrap: str, topic: str, want: set[str], timeout_s: float
) -> dict[str, tuple[int, float, float]]:
    """event id -> (result timestamp ms, time received ms, latencyMs) for ``want``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    seen: dict[str, tuple[int, float, float]] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while not want <= seen.keys() and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100)
            now_ms = time.time() * 1000
            for records in batches.values():
                for record in records:
                    value = orjson.loads(record.value or b"{}")
                    seen[value["eventId"]] = (record.timestamp, now_ms, value["latencyMs"])
    finally:
        await consumer.stop()
    return seen


async def paced_run(
    bootstrap: str, topics: Topics, rate: float, seconds: float
) -> tuple[dict[str, int], dict[str, int], dict[str, tuple[int, float, float]]]:
    """(producer stamps, broker append times, results seen) by event id."""
    count = int(rate * seconds)
    ids = {f"b-{i}" for i in range(WARMUP, WARMUP + count)}
    reader = asyncio.create_task(collect(bootstrap, topics.results, ids, seconds + 120))
    await asyncio.sleep(1)  # the reader joins before the first event
    appended: dict[str, int] = {}
    stamps = await produce(
        bootstrap, topics.input, count, start=WARMUP, rate=rate, appended=appended
    )
    return stamps, appended, await reader


def commit_cycles(port: int) -> tuple[float, float]:
    """(commit cycles so far, their total seconds) from the connector's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    values = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        if line.startswith("threads_connector_commit_duration_seconds_") and "transaction" in line:
            kind = line.split("{", 1)[0].rsplit("_", 1)[1]
            if kind in values:
                values[kind] = float(line.rsplit(" ", 1)[1])
    return values["count"], values["sum"]


def stats(prefix: str, values: list[float]) -> dict[str, float]:
    return {
        f"{prefix}p50_ms": round(percentile(values, 0.50), 1),
        f"{prefix}p95_ms": round(percentile(values, 0.95), 1),
        f"{prefix}p99_ms": round(percentile(values, 0.99), 1),
    }


def one_run(
    name: str,
    src: str | None,
    bootstrap: str,
    base_url: str,
    rate: float,
    seconds: float,
    ramp_s: float,
    dump: str | None = None,
) -> dict[str, Any]:
    """One connector process: 60 events to join, then ``ramp_s + seconds`` of paced load.
    The first ``ramp_s`` seconds (the step from idle to the load, on topics made for the
    run) are reported apart as ``ramp_*``; ``added_*`` is the steady state after them."""
    topics = Topics(f"lat-{name}-{uuid.uuid4().hex[:6]}")
    # the input's timestamps are the broker's append times (the record the connector reads
    # carries them; the producer's own stamps are kept apart): ``in_kafka_*`` leaves out the
    # load generator's way to the broker, which shares its event loop with the reader
    asyncio.run(
        create_topics(bootstrap, topics, input_config={"message.timestamp.type": "LogAppendTime"})
    )
    port = free_ports(1)[0]
    data = connector_config(bootstrap, base_url, topics, "exactly_once", server={"port": port})
    proc = start_connector(data, src)
    try:
        # warm up: joined, first calls made, then the paced load
        asyncio.run(produce(bootstrap, topics.input, WARMUP))
        progress = Progress(time.monotonic(), WARMUP)
        asyncio.run(wait_committed(bootstrap, topics, progress, proc.pid, 120))
        before = progress.last.cpu_s
        cycles_before, spent_before = commit_cycles(port)
        began = time.monotonic()
        stamps, appended, seen = asyncio.run(paced_run(bootstrap, topics, rate, ramp_s + seconds))
        progress = Progress(time.monotonic(), WARMUP + len(stamps))
        asyncio.run(wait_committed(bootstrap, topics, progress, proc.pid, 120))
        cpu_s = progress.last.cpu_s - before
        cycles, spent = commit_cycles(port)
        cycles, spent = cycles - cycles_before, spent - spent_before
        took = time.monotonic() - began
    finally:
        stop_process(proc)
    ramp_ids = {f"b-{i}" for i in range(WARMUP, WARMUP + int(rate * ramp_s))}
    added: dict[str, float] = {
        e: seen[e][0] - ts - seen[e][2] for e, ts in stamps.items() if e in seen
    }
    visible = {e: seen[e][1] - ts - seen[e][2] for e, ts in stamps.items() if e in seen}
    steady = [v for e, v in added.items() if e not in ramp_ids]
    ramp = [v for e, v in added.items() if e in ramp_ids]
    steady_visible = [v for e, v in visible.items() if e not in ramp_ids]
    in_kafka = [
        seen[e][0] - appended[e] - seen[e][2]
        for e in stamps
        if e in seen and e in appended and e not in ramp_ids
    ]
    to_broker = [
        appended[e] - ts for e, ts in stamps.items() if e in appended and e not in ramp_ids
    ]
    if dump:  # stamp, added, visible (ms), append time: to see when the tail happens
        with open(dump, "w") as out:
            for e in added:
                out.write(f"{stamps[e]} {added[e]:.1f} {visible[e]:.1f} {appended.get(e, 0)}\n")
    return {
        "name": name,
        "events": len(stamps),
        "results": len(added),
        **stats("added_", steady),
        "visible_p50_ms": round(percentile(steady_visible, 0.50), 1),
        "visible_p99_ms": round(percentile(steady_visible, 0.99), 1),
        **stats("in_kafka_", in_kafka),
        "to_broker_p99_ms": round(percentile(to_broker, 0.99), 1),
        **stats("ramp_", ramp),
        "all_p99_ms": round(percentile(list(added.values()), 0.99), 1),
        "cpu_ms_per_event": round(cpu_s * 1000 / max(1, len(stamps)), 3),
        "commit_cycles_per_s": round(cycles / took, 1),
        "commit_cycle_mean_ms": round(spent * 1000 / cycles, 1) if cycles else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, help="events/s (default: half the measured max)")
    parser.add_argument(
        "--max-events",
        type=int,
        default=20_000,
        help="to measure the max (10,000 moved it by 40 %% between runs)",
    )
    parser.add_argument("--seconds", type=float, default=30, help="measured, after the ramp")
    parser.add_argument(
        "--ramp-seconds", type=float, default=5, help="paced load first, reported apart"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--dump", help="write each event's latencies to DUMP.<name>.<round>")
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="rounds run first and reported apart (the broker's JVM is minutes old)",
    )
    args = parser.parse_args()
    trees: list[tuple[str, str | None]] = [("current", None)]
    trees += [(spec.split("=", 1)[0], spec.split("=", 1)[1]) for spec in args.compare]
    out: dict[str, Any] = {"load_average": [load_average()]}
    runs: list[dict[str, Any]] = []
    with kafka_bootstrap() as bootstrap, Simulator(0.0) as sim:
        rate = args.rate
        if rate is None:
            start = connector_starter("exactly_once")
            best = run_one("max", start, bootstrap, sim, args.max_events, 0)
            out["max_steady_per_s"] = best.steady_per_s
            out["max_per_s"] = best.events_per_s
            # a small backlog may pass 10 % and 90 % committed in one poll: no steady rate
            top = best.steady_per_s if math.isfinite(best.steady_per_s) else best.events_per_s
            rate = round(top / 2, 1)
        out["rate_per_s"] = rate
        warmups: list[dict[str, Any]] = []
        for round_ in range(-args.warmup_rounds, args.rounds):
            order = trees if round_ % 2 == 0 else trees[::-1]
            for name, src in order:
                dump = f"{args.dump}.{name}.{round_}" if args.dump else None
                run = one_run(
                    name, src, bootstrap, sim.base_url, rate, args.seconds, args.ramp_seconds, dump
                )
                (warmups if round_ < 0 else runs).append(run)
                what = "warm-up" if round_ < 0 else f"round {round_}"
                sys.stderr.write(f"{what}: {run}\n")
            out["load_average"].append(load_average())
    out["warmup_runs"] = warmups
    out["runs"] = runs
    for name, _ in trees:
        mine = [r for r in runs if r["name"] == name]
        out[name] = {
            key: statistics.median(r[key] for r in mine)
            for key in mine[0]
            if key not in ("name", "events", "results")
        }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    p99 = out["current"]["added_p99_ms"]
    verdict = "met" if p99 <= 100 else "NOT met"
    sys.stdout.write(f"target (steady added p99 <= 100 ms): {verdict}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
