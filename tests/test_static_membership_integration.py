"""Static group membership (``kafka.group_instance_id``): a replica restarted within the
session timeout gets its partitions back and the others never pause; a replica above
``kafka.static_members`` is a dynamic member and hands its partitions over at once when it
stops. Real broker, connectors in this process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from connector.app import Connector
from connector.config import ConnectorSettings
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, ensure_topics, make_settings, running

pytestmark = [pytest.mark.integration]

SESSION_TIMEOUT_MS = 20_000


def member(base: ConnectorSettings, name: str, static_members: int | None) -> ConnectorSettings:
    kafka = {"group_instance_id": name, "static_members": static_members}
    return base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update=kafka),
            "delivery": base.delivery.model_copy(update={"instance_id": name}),
        }
    )


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``condition`` held."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def assigned(connector: Connector) -> list[tuple[str, int]]:
    return connector.session.assigned if connector.session is not None else []


def revokes(connector: Connector) -> float:
    return float(connector.metrics.rebalances.labels("revoke")._value.get())


async def _group(kafka_bootstrap: str, tag: str, seed: int) -> tuple[ConnectorSettings, Names]:
    names = Names.fresh(tag)
    base = make_settings(
        kafka_bootstrap,
        "http://127.0.0.1:1",
        names,
        partitions=4,
        kafka={"session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": 1_000},
    )
    await ensure_topics(base)
    return base, names


async def test_a_static_member_restarted_in_time_moves_no_partition(kafka_bootstrap: str) -> None:
    async with ThreadsApiSimulator(SimulatorSettings(seed=21)) as sim:
        base, _ = await _group(kafka_bootstrap, "static", 21)
        base = base.model_copy(
            update={"api": base.api.model_copy(update={"base_url": sim.base_url})}
        )
        a, b = member(base, "conn-0", None), member(base, "conn-1", None)
        async with running(a) as first:
            async with running(b) as second:
                await until(lambda: len(assigned(second)) == 2, 30, "conn-1 never assigned")
                await until(lambda: len(assigned(first)) == 2, 30, "conn-0 never settled")
                held = sorted(assigned(second))
            before = revokes(first)
            async with running(b) as again:  # the same pod name, back within the timeout
                await until(lambda: len(assigned(again)) == 2, 30, "conn-1 never came back")
                assert sorted(assigned(again)) == held  # its own partitions, unmoved
                assert revokes(first) == before  # conn-0 never paused (no rebalance)
                assert len(assigned(first)) == 2


async def test_a_dynamic_member_above_static_members_hands_over_at_once(
    kafka_bootstrap: str,
) -> None:
    async with ThreadsApiSimulator(SimulatorSettings(seed=22)) as sim:
        base, _ = await _group(kafka_bootstrap, "scalein", 22)
        base = base.model_copy(
            update={"api": base.api.model_copy(update={"base_url": sim.base_url})}
        )
        # conn-0 is below static_members (static), conn-1 above (an autoscaler's extra)
        a, b = member(base, "conn-0", 1), member(base, "conn-1", 1)
        async with running(a) as first:
            async with running(b) as second:
                await until(lambda: len(assigned(second)) == 2, 30, "conn-1 never assigned")
                await until(lambda: len(assigned(first)) == 2, 30, "conn-0 never settled")
            # conn-1 left the group on its way out: no wait for the session timeout
            took = await until(lambda: len(assigned(first)) == 4, 15, "no hand-over")
        assert took < SESSION_TIMEOUT_MS / 1000 / 2, took
