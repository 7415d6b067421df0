"""connector.exposure: the cap on calls whose results are not committed, and the stop while
commit cycles fail or stall."""

from __future__ import annotations

import asyncio

from connector.exposure import Exposure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_cap_stops_new_calls_until_results_commit() -> None:
    exposure = Exposure(2, 5.0)
    await exposure.enter()
    await exposure.enter()
    third = asyncio.create_task(exposure.enter())
    await asyncio.sleep(0.01)
    assert not third.done() and exposure.held == 2
    exposure.cycle_started()
    exposure.cycle_succeeded(results=1)
    await asyncio.wait_for(third, 1)
    assert exposure.held == 2


async def test_a_call_without_a_thread_gives_its_unit_back() -> None:
    exposure = Exposure(1, 5.0)
    await exposure.enter()
    waiting = asyncio.create_task(exposure.enter())
    await asyncio.sleep(0.01)
    exposure.leave()
    await asyncio.wait_for(waiting, 1)
    assert exposure.held == 1


async def test_a_failed_cycle_stops_calls_until_one_succeeds() -> None:
    exposure = Exposure(10, 5.0)
    exposure.cycle_started()
    exposure.cycle_failed()
    assert not exposure.is_open
    waiting = asyncio.create_task(exposure.enter())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    exposure.cycle_started()
    exposure.cycle_succeeded(results=0)
    await asyncio.wait_for(waiting, 1)
    assert exposure.is_open


def test_a_stalled_cycle_closes_the_gate_and_a_new_session_can_start_closed() -> None:
    clock = Clock()
    exposure = Exposure(10, 5.0, clock=clock)
    exposure.cycle_started()
    clock.now += 4.9
    assert exposure.is_open
    clock.now += 0.2
    assert exposure.stalled and not exposure.is_open
    exposure.cycle_succeeded(results=0)
    assert exposure.is_open
    assert not Exposure(10, 5.0, healthy=False).is_open
