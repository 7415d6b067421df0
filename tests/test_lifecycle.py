"""Stopping the process while Kafka does not answer: a broker that accepts connections and
never replies (a paused JVM, a half-open network path) must not hold a SIGTERM for the
request timeout. Before the group is joined nothing has been consumed, so stopping at
once loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from connector.app import Connector
from tests.harness import Names, make_settings


@pytest.fixture
def tarpit() -> Iterator[tuple[str, list[socket.socket]]]:
    """A listener whose connections complete (the kernel's backlog) and never answer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        for conn in accepted:
            conn.close()
        server.close()


async def test_a_stop_during_start_up_against_a_silent_broker_is_prompt(
    tarpit: tuple[str, list[socket.socket]],
) -> None:
    bootstrap, _ = tarpit
    settings = make_settings(
        bootstrap,
        "http://127.0.0.1:1",
        Names.fresh("silent"),
        kafka={"request_timeout_ms": 120_000, "probe_interval_s": 60},
    )
    connector = Connector(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        for _ in range(100):  # the health server is up: start-up is under way
            if connector.health.port:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the admin client is waiting on the silent broker
        assert not task.done()
        stop.set()
        # it used to return only when the 120 s request timeout ran out
        await asyncio.wait_for(task, 20)
        assert not connector.started.is_set()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
