"""CPU per request of the candidate HTTP stacks, side by side in one run (issue 10).

Starts the Threads API simulator in a process of its own (0 ms latency, no rate limit, so
its CPU is not ours), then for each stack and each concurrency makes ``--requests`` calls
of ``POST /api/v1/appuid/{appUid}/threads`` from ``concurrency`` workers sharing one
client whose pool is sized to the concurrency, and reports this process's CPU time per
request (``time.process_time``) and the ratio to the cheapest stack.

Stacks:
- ``httpx``: httpx over its default transport (httpcore), what the connector used;
- ``httpx-aiohttp``: httpx over the aiohttp transport (needs ``pip install httpx-aiohttp``);
- ``aiohttp``: aiohttp's ClientSession directly;
- ``connector``: ``connector.threads_client.ThreadsClient`` as it is now (whatever stack
  it is built on, with its deadline and body limit).

    python -m bench.http_clients [--requests 4000] [--concurrency 16 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import orjson
from pydantic import SecretStr

from connector.localkafka.ports import free_ports
from connector.routing import ThreadRequest
from connector.threads_client import ThreadsClient

PATH = "/api/v1/appuid/demo-app/threads"
KEY = "demo-key"
BODY = orjson.dumps(
    {"agentUid": "agent-orders", "message": "bench", "messageType": "system", "humanUid": "h-1"}
)
REQUEST = ThreadRequest(
    app_uid="demo-app",
    agent_uid="agent-orders",
    message="bench",
    message_type="system",
    identifier_field="humanUid",
    identifier_value="h-1",
)
Post = Callable[[int], Awaitable[None]]
Stack = Callable[[str, int], contextlib.AbstractAsyncContextManager[Post]]


def _headers(i: int) -> dict[str, str]:
    return {
        "x-api-key": KEY,
        "content-type": "application/json",
        "x-event-id": f"e-{i}",
        "x-correlation-id": f"c-{i}",
    }


@contextlib.asynccontextmanager
async def httpx_default(base_url: str, limit: int) -> AsyncIterator[Post]:
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def post(i: int) -> None:
            response = await client.post(PATH, content=BODY, headers=_headers(i))
            orjson.loads(response.content)

        yield post


@contextlib.asynccontextmanager
async def httpx_aiohttp(base_url: str, limit: int) -> AsyncIterator[Post]:
    from httpx_aiohttp import AiohttpTransport  # optional: only for this comparison

    transport = AiohttpTransport(
        client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    )
    async with httpx.AsyncClient(base_url=base_url, transport=transport, timeout=30) as client:

        async def post(i: int) -> None:
            response = await client.post(PATH, content=BODY, headers=_headers(i))
            orjson.loads(response.content)

        yield post


@contextlib.asynccontextmanager
async def aiohttp_direct(base_url: str, limit: int) -> AsyncIterator[Post]:
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:

        async def post(i: int) -> None:
            async with session.post(PATH, data=BODY, headers=_headers(i)) as response:
                orjson.loads(await response.read())

        yield post


@contextlib.asynccontextmanager
async def connector_client(base_url: str, limit: int) -> AsyncIterator[Post]:
    async with ThreadsClient(
        base_url,
        lambda: SecretStr(KEY),
        connect_timeout_s=5,
        request_timeout_s=30,
        max_in_flight=limit,
    ) as client:

        async def post(i: int) -> None:
            await client.create_thread(REQUEST, event_id=f"e-{i}", correlation_id=f"c-{i}")

        yield post


STACKS: dict[str, Stack] = {
    "httpx": httpx_default,
    "httpx-aiohttp": httpx_aiohttp,
    "aiohttp": aiohttp_direct,
    "connector": connector_client,
}


async def measure(stack: Stack, base_url: str, concurrency: int, requests: int) -> float:
    """CPU seconds of this process per request (after a warm-up of one round)."""
    async with stack(base_url, concurrency) as post:
        counter = iter(range(requests + concurrency * 2))

        async def worker(n: int) -> None:
            for i in counter:
                if i >= n:
                    return
                await post(i)

        await asyncio.gather(*(worker(concurrency * 2) for _ in range(concurrency)))
        counter = iter(range(requests))
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(requests) for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"    {requests / wall:8.0f} req/s wall", file=sys.stderr)
    return cpu / requests


@contextlib.contextmanager
def simulator() -> Any:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.simulator", "--port", str(port), "--log-level", "ERROR"]
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base_url}/_simulator/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    args = parser.parse_args()
    stacks = [
        s for s in args.stacks if s != "httpx-aiohttp" or importlib.util.find_spec("httpx_aiohttp")
    ]
    rows: dict[str, dict[int, float]] = {}
    with simulator() as base_url:
        for concurrency in args.concurrency:
            for name in stacks:
                print(f"{name} at {concurrency} in flight ...", file=sys.stderr)
                cpu = asyncio.run(measure(STACKS[name], base_url, concurrency, args.requests))
                rows.setdefault(name, {})[concurrency] = cpu
    best = {c: min(r[c] for r in rows.values()) for c in args.concurrency}
    head = "".join(f" | {c:>4} in flight: ms CPU/req (x best)" for c in args.concurrency)
    print(f"{'stack':<14}{head}")
    for name, by_c in rows.items():
        cells = "".join(
            f" | {by_c[c] * 1000:>22.3f} ({by_c[c] / best[c]:4.1f}x)" for c in args.concurrency
        )
        print(f"{name:<14}{cells}")


if __name__ == "__main__":
    main()
