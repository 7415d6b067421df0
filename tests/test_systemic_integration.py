"""Systemic API failures on a real broker (issue 21 item 1): a configuration fault pauses
its route with its events kept; only an event's own failure is dead-lettered."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from connector.config import ConnectorSettings
from connector.simulator import ThreadsApiSimulator
from tests.harness import (
    API_KEY,
    ROUTES,
    Names,
    event,
    make_settings,
    produce,
    read_all,
    results,
    running,
    simulator_fixture,
    wait_until_committed,
)
from tests.kafka_helpers import header
from tests.test_hostile_api import readyz

pytestmark = pytest.mark.integration

THREADS_PATH = "/api/v1/appuid/demo-app/threads"


sim = simulator_fixture(seed=3)


def responses(connector: Any, code: str) -> float:
    value = connector.metrics.registry.get_sample_value(
        "threads_connector_api_responses_total",
        {"status_class": code[0] + "xx", "code": code, "app": "demo-app"},
    )
    return value or 0.0


def with_base_url(settings: ConnectorSettings, base_url: str) -> ConnectorSettings:
    """The same settings, ``api.base_url`` fixed (a restart with the corrected config)."""
    api = settings.api.model_copy(update={"base_url": base_url})
    return settings.model_copy(update={"api": api})


async def test_a_wrong_base_url_pauses_the_route_and_dead_letters_nothing(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """``api.base_url`` with one segment too many: every call is answered 404. Before,
    every event was dead-lettered (``http_404``) with /readyz 200. Now, at the default
    ``api.pause_after_failures`` (20): nothing is dead-lettered, /readyz names the app,
    the route, the status and the path called, the probe keeps failing without a dead
    letter, and the same events make their threads once the configuration is fixed."""
    names = Names.fresh("path")
    n = 60
    wrong = make_settings(
        kafka_bootstrap,
        sim.base_url + "/api/v1",
        names,
        # the start-up probe off (it pauses the app before any call: test_startup_checks_
        # integration): the route pause, for a path that breaks while running
        api={"pause_probe_interval_s": 0.5, "startup_probe": False},
    )
    ids = [f"p-{i}" for i in range(n)]
    async with running(wrong) as connector:
        started = time.monotonic()
        await produce(kafka_bootstrap, names.input, [(str(i).encode(), event(i)) for i in ids])
        deadline = started + 30
        while True:
            status, detail = await readyz(connector)
            if "HTTP 404" in detail:
                break
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.05)
        named_after_s = time.monotonic() - started
        assert status == 503
        assert "app demo-app" in detail and "route */order.shipped paused" in detail
        assert f"POST /api/v1{THREADS_PATH}" in detail
        assert API_KEY not in detail and sim.base_url not in detail
        paused = connector.metrics.route_paused_status.labels("demo-app", "*/order.shipped")
        assert paused._value.get() == 404
        # the probe fails again and again: still nothing dead-lettered
        first = responses(connector, "404")
        deadline = time.monotonic() + 30
        while responses(connector, "404") < first + 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await readyz(connector))[0] == 503
        dead_during = await read_all(kafka_bootstrap, names.dead)
    print(  # the figures for the report (pytest -s)
        f"\nwrong path: {len(dead_during)} dead letters, /readyz named the cause "
        f"{named_after_s:.2f}s after the events were produced"
    )
    assert dead_during == []
    assert await results(kafka_bootstrap, names.results) == []
    assert len(sim.store) == 0

    fixed = with_base_url(wrong, sim.base_url)
    async with running(fixed) as connector:
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert (await readyz(connector))[0] == 200
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == sorted(
        ids
    )
    assert sim.store.count_by_event_id() == {i: 1 for i in ids}


async def test_a_route_whose_agent_is_missing_pauses_that_route_only(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """One route names an agent the API does not have (404 for each of its events); the
    other works. The broken route pauses after a run of 5 with at most 4 dead letters;
    the working one makes its threads; /readyz names the broken route."""
    names = Names.fresh("agent")
    routes = [
        dict(ROUTES[0]),
        {**ROUTES[0], "event_type": "order.cancelled", "agent_uid": "agent-nobody"},
    ]
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        routes=routes,
        api={"pause_after_failures": 5, "pause_probe_interval_s": 0.5},
    )
    good = [f"g-{i}" for i in range(10)]
    bad = [f"b-{i}" for i in range(10)]
    records = [(b"k", event(i)) for i in good]
    records += [(b"k", event(i, type="order.cancelled")) for i in bad]
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        deadline = time.monotonic() + 30
        while True:
            status, detail = await readyz(connector)
            if "order.cancelled paused" in detail and len(sim.store) == len(good):
                break
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.1)
        assert status == 503
        assert "HTTP 404: Agent not found" in detail and f"POST {THREADS_PATH}" in detail
        assert "*/order.shipped" not in detail
        made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
        deadline = time.monotonic() + 30
        while made != sorted(good):  # published in the next commit cycles
            assert time.monotonic() < deadline, made
            await asyncio.sleep(0.2)
            made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    dead = await read_all(kafka_bootstrap, names.dead)
    assert len(dead) <= 4
    assert {header(d, "dlq-code") for d in dead} <= {"http_404"}


async def test_one_events_own_failure_among_successes_is_dead_lettered(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """The agent comes from the event: one event names an agent the API does not have.
    That 404 is the event's: dead-lettered (its reason shows the path called), the others
    make their threads, /readyz stays 200."""
    names = Names.fresh("own")
    routes = [{**ROUTES[0], "agent_uid": "${data.agent}"}]
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1, routes=routes)
    good = [f"o-{i}" for i in range(10)]
    records = [(b"k", event(i, data={"orderId": "A", "agent": "agent-orders"})) for i in good]
    records.insert(5, (b"k", event("o-bad", data={"orderId": "A", "agent": "agent-nobody"})))
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert (await readyz(connector))[0] == 200
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert header(dead, "dlq-code") == "http_404"
    assert header(dead, "dlq-event-id") == "o-bad"
    assert f"(POST {THREADS_PATH})" in header(dead, "dlq-reason")
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == good


async def test_stop_mode_stops_at_the_first_api_error_and_keeps_the_events(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    """``api.on_error: stop`` (Kafka Connect's errors.tolerance=none): the first 404 stops
    every call; nothing is dead-lettered or committed past it; /readyz says why and to
    restart; a restart with the fixed configuration makes every thread."""
    names = Names.fresh("stop")
    wrong = make_settings(
        kafka_bootstrap,
        sim.base_url + "/api/v1",
        names,
        partitions=1,
        # the start-up probe off: a path that breaks while running (a gateway's route removed)
        api={"on_error": "stop", "startup_probe": False},
    )
    ids = [f"s-{i}" for i in range(5)]
    async with running(wrong) as connector:
        await produce(kafka_bootstrap, names.input, [(b"k", event(i)) for i in ids])
        deadline = time.monotonic() + 30
        while "stopped" not in (detail := (await readyz(connector))[1]):
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.05)
        assert "api.on_error=stop" in detail and "restart" in detail
        assert f"HTTP 404: Not Found (POST /api/v1{THREADS_PATH})" in detail
        assert connector.metrics.api_stopped._value.get() == 1
    assert await read_all(kafka_bootstrap, names.dead) == []
    fixed = with_base_url(wrong, sim.base_url)
    async with running(fixed):
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids
    assert await read_all(kafka_bootstrap, names.dead) == []
