"""A hostile review of the systemic-failure pause (issue 21 item 1) on a real broker: the
cases its first tests did not try."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import SecretStr

from connector.app import Connector
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.simulator.settings import DEFAULT_AGENTS, AppSpec, LatencySpec
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
    wait_until_committed,
)
from tests.kafka_helpers import header
from tests.test_hostile_api import readyz

pytestmark = pytest.mark.integration

QUIET_ROUTE = {
    **ROUTES[0],
    "event_type": "order.cancelled",
    "app_uid": "quiet-app",
    "agent_uid": "${data.agent}",
}


@pytest.fixture
async def two_apps() -> ThreadsApiSimulator:
    """demo-app, and quiet-app (same key) whose only agent is ``agent-quiet``."""
    apps = {
        "demo-app": AppSpec(api_key=SecretStr(API_KEY), agents=list(DEFAULT_AGENTS)),
        "quiet-app": AppSpec(api_key=SecretStr(API_KEY), agents=["agent-quiet"]),
    }
    async with ThreadsApiSimulator(SimulatorSettings(seed=5, apps=apps)) as simulator:
        yield simulator


async def test_a_quiet_apps_first_event_failing_on_its_own_does_not_stall_the_connector(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator
) -> None:
    """The first event of an app that gets little traffic names an agent the API does not
    have (404, the event's own fault), and no other event of that app follows. Before, it
    was held for the app's first success, for ever: its partition's committed offset
    stopped at it, the events of the busy app behind it stayed buffered, and once
    ``delivery.max_buffered_events`` of them waited every partition stopped fetching. The
    whole connector made no thread while /readyz said 200. Now a probe that cannot create
    a thread (an invalid body, answered 400) proves the app's path and key, and the event
    is dead-lettered: every other event makes its thread and every offset is committed."""
    names = Names.fresh("quiet")
    settings = make_settings(
        kafka_bootstrap,
        two_apps.base_url,
        names,
        partitions=1,
        routes=[dict(ROUTES[0]), QUIET_ROUTE],
        delivery={"max_buffered_events": 10},
        api={"pause_probe_interval_s": 0.5},
    )
    bad = event("q-bad", type="order.cancelled", data={"orderId": "A", "agent": "agent-gone"})
    busy = [f"b-{i}" for i in range(40)]
    records = [(b"k", bad)] + [(b"k", event(i)) for i in busy]
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=30)
        assert (await readyz(connector))[0] == 200
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert header(dead, "dlq-event-id") == "q-bad"
    assert header(dead, "dlq-code") == "http_404"
    made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert made == sorted(busy)
    assert len(two_apps.store) == len(busy)


async def test_a_wrong_path_is_not_proven_by_the_probe(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator
) -> None:
    """The probe that proves an app must not prove a wrong ``api.base_url``: it answers
    404 there too, so a few events of a wrong path are held, not dead-lettered, and stay
    held (nothing dead-lettered) while the probe keeps failing."""
    names = Names.fresh("qpath")
    settings = make_settings(
        kafka_bootstrap,
        two_apps.base_url + "/api/v1",
        names,
        partitions=1,
        # a path that breaks while running: the start-up probe would pause the app first
        api={"pause_probe_interval_s": 0.2, "startup_probe": False},
    )
    ids = [f"w-{i}" for i in range(3)]  # fewer than api.pause_after_failures
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, [(b"k", event(i)) for i in ids])
        deadline = time.monotonic() + 20
        registry = connector.metrics.registry
        while registry.get_sample_value("threads_connector_calls_held", {"app": "demo-app"}) < len(
            ids
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        labels = {"status_class": "4xx", "code": "404", "app": "demo-app"}
        sample = "threads_connector_api_responses_total"
        before = registry.get_sample_value(sample, labels) or 0
        deadline = time.monotonic() + 20
        while (registry.get_sample_value(sample, labels) or 0) < before + 3:  # probes go on
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert len(two_apps.store) == 0


async def test_bad_events_interleaved_with_good_ones_never_pause_the_route(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """20 events naming a missing agent interleaved with 20 good ones on one route, at
    the default ``api.pause_after_failures`` (20): each bad one is its own failure. The
    API answers a 404 at once and a success after its latency, so the 404s all come back
    before the first success of the same fetch: that must not pause the route (no pause
    line, no ``route_paused_status``), and the 20 are dead-lettered."""
    names = Names.fresh("mix")
    routes = [{**ROUTES[0], "agent_uid": "${data.agent}"}]
    settings = make_settings(
        kafka_bootstrap,
        two_apps.base_url,
        names,
        partitions=1,
        routes=routes,
        api={"ramp_up_s": 0},
    )
    two_apps.set_latency(LatencySpec(distribution="fixed", median_ms=200))
    good = [f"g-{i}" for i in range(20)]
    bad = [f"x-{i}" for i in range(20)]
    records: list[tuple[bytes | None, bytes | None]] = []
    for g, b in zip(good, bad, strict=True):
        records.append((b"k", event(g, data={"orderId": "A", "agent": "agent-orders"})))
        records.append((b"k", event(b, data={"orderId": "A", "agent": "agent-gone"})))
    caplog.set_level("WARNING", logger="connector.systemic")
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert (await readyz(connector))[0] == 200
    assert [r.getMessage() for r in caplog.records if "paused" in r.getMessage()] == []
    dead = await read_all(kafka_bootstrap, names.dead)
    assert sorted(header(d, "dlq-event-id") for d in dead) == sorted(bad)
    made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert made == sorted(good)


async def test_a_paused_route_keeps_no_exposure_units_and_sigterm_while_paused_loses_nothing(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator
) -> None:
    """A route whose agent is missing pauses; its events wait. Before, every event
    answered 404 kept its unit of ``delivery.max_uncommitted_threads`` while it waited
    (no thread exists for a 404): with a cap of 10, ten of them closed the exposure gate
    for good and the other route of the same app made no thread at all. Now a 4xx gives
    its unit back. Then a drain while paused ends within the drain deadline, commits
    nothing past the waiting events, and a restart with the route fixed makes every
    thread once."""
    names = Names.fresh("expo")
    bad_route = {**ROUTES[0], "event_type": "order.cancelled", "agent_uid": "agent-nobody"}
    settings = make_settings(
        kafka_bootstrap,
        two_apps.base_url,
        names,
        partitions=1,
        routes=[dict(ROUTES[0]), bad_route],
        delivery={"max_uncommitted_threads": 10},
        api={"pause_after_failures": 5},
    )
    bad = [f"c-{i}" for i in range(20)]
    good = [f"s-{i}" for i in range(20)]
    records = [(b"k", event(i, type="order.cancelled")) for i in bad]
    records += [(b"k", event(i)) for i in good]
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        deadline = time.monotonic() + 20
        while len(two_apps.store) < len(good):
            assert time.monotonic() < deadline, f"{len(two_apps.store)} threads of {len(good)}"
            await asyncio.sleep(0.05)
        status, detail = await readyz(connector)
        assert status == 503 and "route */order.cancelled paused" in detail
        drain_started = time.monotonic()
    drained_s = time.monotonic() - drain_started
    assert drained_s < settings.delivery.drain_timeout_s
    dead = await read_all(kafka_bootstrap, names.dead)
    assert len(dead) <= 4  # pause_after_failures - 1
    fixed = make_settings(
        kafka_bootstrap,
        two_apps.base_url,
        names,
        partitions=1,
        routes=[dict(ROUTES[0]), {**bad_route, "agent_uid": "agent-orders"}],
    )
    async with running(fixed):
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=30)
    dead_ids = {header(d, "dlq-event-id") for d in dead}
    made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert made == sorted(set(good + bad) - dead_ids)
    assert set(two_apps.store.count_by_event_id().values()) == {1}
    print(f"\ndrain while paused: {drained_s:.2f}s, {len(dead)} dead letters")


async def test_readiness_says_when_a_paused_routes_events_stop_every_partition(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator
) -> None:
    """A paused route keeps its events, and no offset can be committed past them: the
    events fetched behind them (any route's) stay buffered, and once
    ``delivery.max_buffered_events`` are, every partition stops fetching. Measured (3
    partitions, buffer 40, 30 events of a route whose agent is missing then 200 of a
    working one): 34 threads of 200 in 15 s, then none. /readyz named the route's pause
    but not that every other route had stopped with it; now it says so."""
    names = Names.fresh("buf")
    bad_route = {**ROUTES[0], "event_type": "order.cancelled", "agent_uid": "agent-nobody"}
    settings = make_settings(
        kafka_bootstrap,
        two_apps.base_url,
        names,
        routes=[dict(ROUTES[0]), bad_route],
        delivery={"max_buffered_events": 40},
        api={"pause_after_failures": 5},
    )
    records = [(str(i).encode(), event(f"c-{i}", type="order.cancelled")) for i in range(30)]
    records += [(str(i).encode(), event(f"s-{i}")) for i in range(200)]
    async with running(settings) as connector:
        await produce(kafka_bootstrap, names.input, records)
        deadline = time.monotonic() + 30
        while "stopped fetching" not in (detail := (await readyz(connector))[1]):
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.1)
    assert "route */order.cancelled paused" in detail
    assert "delivery.max_buffered_events (40)" in detail


async def test_a_rebalance_while_a_route_is_paused_loses_nothing(
    kafka_bootstrap: str, two_apps: ThreadsApiSimulator
) -> None:
    """A route paused on one replica, a second replica joins (a rebalance moves some of
    the waiting events to it, which learns the pause on its own), both leave; a restart
    with the route fixed makes every thread once. Dead letters: at most
    ``pause_after_failures - 1`` per replica, before each one's pause."""
    names = Names.fresh("rebal")
    bad_route = {**ROUTES[0], "event_type": "order.cancelled", "agent_uid": "agent-nobody"}

    def settings_with(agent: str) -> Any:
        return make_settings(
            kafka_bootstrap,
            two_apps.base_url,
            names,
            routes=[dict(ROUTES[0]), {**bad_route, "agent_uid": agent}],
            api={"pause_after_failures": 3, "pause_probe_interval_s": 0.5},
        )

    bad = [f"c-{i}" for i in range(30)]
    good = [f"s-{i}" for i in range(30)]
    records = [(str(i).encode(), event(i, type="order.cancelled")) for i in bad]
    records += [(str(i).encode(), event(i)) for i in good]
    async with running(settings_with("agent-nobody")) as first:
        await produce(kafka_bootstrap, names.input, records)
        deadline = time.monotonic() + 30
        while "order.cancelled paused" not in (await readyz(first))[1]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        async with running(settings_with("agent-nobody")) as second:
            deadline = time.monotonic() + 60
            while not (assigned(first) and assigned(second)):  # the rebalance is done
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # a few probes of the moved events fail (0.5 s each)
    dead = await read_all(kafka_bootstrap, names.dead)
    assert len(dead) <= 2 * 2
    async with running(settings_with("agent-orders")):
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
    dead_ids = {header(d, "dlq-event-id") for d in dead}
    made = sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results))
    assert made == sorted(set(good + bad) - dead_ids)
    assert set(two_apps.store.count_by_event_id().values()) == {1}
    print(f"\nrebalance while paused: {len(dead)} dead letters")


def assigned(connector: Connector) -> list[tuple[str, int]]:
    session = connector.session
    return list(session.assigned) if session is not None else []
