"""Memory and health-check latency with 5,000 calls in flight (issue 11).

One ``connector run`` process (``exactly_once``, api.max_in_flight 5,000, fetching paused
only above 10,000 buffered events), the Threads API simulator in its own process answering
after 20 s, and a backlog larger than what can be in flight. Once the connector holds
(nearly) 5,000 connections to the simulator, for ``--window-s`` seconds:

- ``GET /healthz`` one after another (10 s timeout each): p50 / p99 / max latency;
- ``GET /metrics`` every 2 s: latency (it renders every series);
- the connector's RSS (``/proc``), and its peak.

Targets: RSS <= 300 MB, /healthz p99 <= 50 ms.

    python -m bench.inflight [--in-flight 5000] [--latency-ms 20000] [--window-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench.common import (
    Simulator,
    Topics,
    connector_config,
    create_topics,
    kafka_bootstrap,
    load_average,
    produce,
    sample_proc,
    start_connector,
    stop_process,
)
from connector.localkafka.ports import free_ports


def sockets(pid: int) -> int:
    """Open sockets of the process: its connections to the API, plus a few to Kafka."""
    n = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            n += os.readlink(fd_dir / fd).startswith("socket:")
        except OSError:
            continue
    return n


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(base: str, pid: int, window_s: float) -> dict[str, object]:
    health: list[float] = []
    metrics: list[float] = []
    rss: list[float] = []
    timeouts = 0
    async with httpx.AsyncClient(timeout=10) as http:

        async def scrape() -> None:
            while True:
                began = time.perf_counter()
                try:
                    await http.get(f"{base}/metrics")
                    metrics.append((time.perf_counter() - began) * 1000)
                except httpx.TimeoutException:
                    metrics.append(10_000.0)
                await asyncio.sleep(2)

        scraper = asyncio.create_task(scrape())
        end = time.monotonic() + window_s
        while time.monotonic() < end:
            began = time.perf_counter()
            try:
                await http.get(f"{base}/healthz")
                health.append((time.perf_counter() - began) * 1000)
            except httpx.TimeoutException:
                timeouts += 1
                health.append(10_000.0)
            sample = sample_proc(pid)
            if sample is not None:
                rss.append(sample.rss_mb)
            await asyncio.sleep(0.02)
        scraper.cancel()
    peak = sample_proc(pid)
    return {
        "healthz_probes": len(health),
        "healthz_timeouts_10s": timeouts,
        "healthz_p50_ms": round(percentile(health, 0.50), 1),
        "healthz_p99_ms": round(percentile(health, 0.99), 1),
        "healthz_max_ms": round(max(health, default=float("nan")), 1),
        "metrics_scrapes": len(metrics),
        "metrics_median_ms": round(statistics.median(metrics), 1) if metrics else None,
        "metrics_max_ms": round(max(metrics, default=float("nan")), 1),
        "rss_mb_median": round(statistics.median(rss), 1) if rss else None,
        "rss_mb_max": round(max(rss, default=float("nan")), 1),
        "peak_rss_mb": round(peak.peak_rss_mb, 1) if peak else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=5_000)
    parser.add_argument("--latency-ms", type=float, default=20_000)
    parser.add_argument("--window-s", type=float, default=30)
    parser.add_argument("--src", help="run the connector from this source tree")
    args = parser.parse_args()
    n = args.in_flight
    result: dict[str, object] = {"in_flight_target": n, "load_average_before": load_average()}
    with kafka_bootstrap() as bootstrap, Simulator(args.latency_ms) as sim:
        topics = Topics(f"inflight-{uuid.uuid4().hex[:6]}")
        port = free_ports(1)[0]
        data = connector_config(
            bootstrap,
            sim.base_url,
            topics,
            "exactly_once",
            api={
                "max_in_flight": n,
                "request_timeout_s": args.latency_ms / 1000 + 30,
            },
            # the configuration refuses deadlines shorter than a call may take; the bench
            # stops the process after 30 s of drain anyway (stop_process)
            delivery={
                "max_buffered_events": 2 * n,
                # the exposure cap (default 1,000) would hold the calls started below n
                "max_uncommitted_threads": n,
                "drain_timeout_s": args.latency_ms / 1000 + 31,
                "revoke_timeout_s": args.latency_ms / 1000 + 31,
            },
            server={"port": port},
        )

        async def setup() -> None:
            await create_topics(bootstrap, topics)
            await produce(bootstrap, topics.input, int(n * 2.5))

        asyncio.run(setup())
        proc = start_connector(data, args.src)
        try:
            began = time.monotonic()
            deadline = began + args.latency_ms / 1000 + 60
            held = 0
            while time.monotonic() < deadline:
                held = sockets(proc.pid)
                if held >= 0.97 * n:
                    break
                time.sleep(0.2)
            result["ramp_s"] = round(time.monotonic() - began, 1)
            result["sockets_at_start"] = held
            base = f"http://127.0.0.1:{port}"
            result.update(asyncio.run(measure(base, proc.pid, args.window_s)))
            result["sockets_at_end"] = sockets(proc.pid)
        finally:
            stop_process(proc, timeout_s=30)
    result["load_average_after"] = load_average()
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    rss = result.get("peak_rss_mb") or 0
    p99 = result.get("healthz_p99_ms") or 0
    met = isinstance(rss, float) and isinstance(p99, float) and rss <= 300 and p99 <= 50
    sys.stdout.write(
        f"targets (RSS <= 300 MB, /healthz p99 <= 50 ms): {'met' if met else 'NOT met'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
