"""The health/metrics server: its own thread, bounded; slow clients are cut off; a flood of
scrapes leaves the probes answering and the pipeline flowing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from connector.config import ServerSettings
from connector.health import HealthServer
from connector.metrics import Metrics
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, make_settings, produce, running, wait_until_committed

# 2,000 concurrent GET /metrics, wave after wave, from a process of its own (so the flood
# does not share this process's CPU time with the connector under test)
FLOOD = r"""
import asyncio, sys, time
port, concurrency, duration = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def one():
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
        return 1
    except OSError:
        return 0
async def main():
    end, done = time.monotonic() + duration, 0
    while time.monotonic() < end:  # until terminated, in practice
        done += sum(await asyncio.gather(*(one() for _ in range(concurrency))))
    print(done)
asyncio.run(main())
"""


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("things", "things", registry=registry).inc()
    health = HealthServer(
        "127.0.0.1",
        0,
        registry,
        lambda: (True, "alive"),
        lambda: (False, "kafka: unreachable: connection refused"),
        header_timeout_s=0.5,
    )
    await health.start()
    try:
        yield health
    finally:
        await health.stop()


async def test_endpoints_and_a_server_header_without_version(server: HealthServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        metrics = await http.get("/metrics")
        ready = await http.get("/readyz")
        live = await http.get("/healthz")
        missing = await http.get("/nope")
        posted = await http.post("/metrics")
    assert metrics.status_code == 200 and "things_total 1.0" in metrics.text
    assert ready.status_code == 503
    assert ready.json()["detail"] == "kafka: unreachable: connection refused"
    assert live.status_code == 200 and live.json()["ok"] is True
    assert (missing.status_code, posted.status_code) == (404, 405)
    for response in (metrics, ready, live, missing):
        assert response.headers["server"] == "threads-connector"
        assert not any(ch.isdigit() for ch in response.headers["server"])


def test_the_default_bind_address_is_loopback() -> None:
    assert ServerSettings().host == "127.0.0.1"


async def test_a_slow_header_connection_is_closed(server: HealthServer) -> None:
    def slow_client() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
            sock.settimeout(10)
            began = time.monotonic()
            return sock.recv(1024), time.monotonic() - began

    data, waited_s = await asyncio.to_thread(slow_client)
    assert data == b""  # closed by the server, no answer
    assert waited_s < 9  # the server hung up; the client's own timeout did not fire


async def test_connections_beyond_the_limit_wait_and_are_then_served() -> None:
    registry = CollectorRegistry()
    health = HealthServer("127.0.0.1", 0, registry, lambda: (True, "a"), lambda: (True, "r"),
                          max_connections=2, header_timeout_s=1.0)  # fmt: skip
    await health.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", health.port)) for _ in range(2)]
        # both slots are held by clients that send nothing: a third waits unaccepted...
        async with httpx.AsyncClient(timeout=5) as http:
            began = time.monotonic()
            response = await http.get(f"http://127.0.0.1:{health.port}/healthz")
            waited_s = time.monotonic() - began
        # ...until the header timeout frees a slot
        assert response.status_code == 200
        assert waited_s >= 0.5
        for sock in idle:
            sock.close()
    finally:
        await health.stop()


@pytest.mark.integration
async def test_a_flood_of_scrapes_neither_stalls_probes_nor_the_pipeline(
    kafka_bootstrap: str,
) -> None:
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        names = Names.fresh("flood")
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=2)
        metrics = Metrics()
        # a registry the size of a busy deployment's (many topics, partitions, routes)
        series = Gauge("flood_test_series", "filler", ["topic", "partition"],
                       registry=metrics.registry)  # fmt: skip
        for i in range(3000):
            series.labels(f"topic-{i // 50}", str(i % 50)).set(i)
        async with running(settings, metrics) as connector:
            port = connector.health.port
            flood = subprocess.Popen(
                [sys.executable, "-c", FLOOD, str(port), "2000", "120"],
                stdout=subprocess.DEVNULL,
            )
            began = time.monotonic()
            probe_s: list[float] = []
            stop_probing = threading.Event()

            def probe() -> None:
                while not stop_probing.is_set():
                    began = time.monotonic()
                    with contextlib.suppress(httpx.TransportError):  # counted as >= 10 s
                        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                    probe_s.append(time.monotonic() - began)
                    time.sleep(0.1)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            try:
                await asyncio.sleep(1.0)  # the flood is under way
                n = 100
                await produce(kafka_bootstrap, names.input,
                              [(f"u-{i}".encode(), event(f"f-{i}")) for i in range(n)])  # fmt: skip
                await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
                served_during_flood = flood.poll() is None
                took_s = time.monotonic() - began
                await asyncio.sleep(max(0.0, 6.0 - took_s))  # probes under at least 6 s of it
            finally:
                flood.terminate()
                await asyncio.to_thread(flood.wait, 30)
                stop_probing.set()
                await asyncio.to_thread(prober.join, 15)
            served = connector.health.served
        assert sim.store.count_by_event_id() == {f"f-{i}": 1 for i in range(n)}
    assert served_during_flood, "the events were only processed after the flood"
    assert served >= 2000, served  # the flood did reach the server
    assert len(probe_s) >= 5
    assert max(probe_s) < 3.0, sorted(probe_s)[-5:]
