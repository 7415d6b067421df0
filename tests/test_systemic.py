"""connector.systemic through connector.calls: a run of the same 4xx pauses its route,
an event's own 4xx is dead-lettered, and calls that get no answer trip the breaker.

The fake attempt and clock are ``tests.test_calls``'s: nothing really waits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from connector.errors import EventRejected, PermanentApiError, RetriableApiError
from connector.metrics import AppMetrics, Metrics
from connector.systemic import RouteGate, Systemic, Verdict
from tests.test_calls import OK, Harness

PATH = "/v1/api/v1/appuid/demo-app/threads"
PAUSE_PROBE_S = 7.0


def http(status: int, title: str = "Not Found") -> PermanentApiError:
    return PermanentApiError(f"HTTP {status}: {title} (POST {PATH})", status=status, path=PATH)


def timeout() -> RetriableApiError:
    return RetriableApiError(
        "no complete answer within 10s", outcome_unknown=True, kind="timeout", path=PATH
    )


def harness(script: list[Any], **api: Any) -> Harness:
    return Harness(
        script,
        api={"pause_after_failures": 3, "pause_probe_interval_s": PAUSE_PROBE_S} | api,
    )


async def stuck(task: asyncio.Task[Any], spins: int = 200) -> bool:
    """Give the task event-loop turns (its sleeps are fake): True if it is still waiting."""
    for _ in range(spins):
        if task.done():
            return False
        await asyncio.sleep(0)
    return True


async def outcomes(h: Harness, *event_ids: str) -> list[Any]:
    calls = [h.call(event_id) for event_id in event_ids]
    return await asyncio.gather(*calls, return_exceptions=True)


def paused(h: Harness) -> float | None:
    return h.sample("threads_connector_route_paused_status", route="")


async def test_a_run_before_any_success_dead_letters_nothing_and_pauses_the_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wrong-path case: every call 404s from the start. Three distinct events (the
    setting) pause the route with nothing dead-lettered; its probe keeps failing, then
    the API answers and every event is made."""
    h = harness([http(404)] * 3 + [http(404)] * 2 + [OK] * 3)
    seen: list[tuple[float | None, str | None]] = []

    async def look(seconds: float) -> None:
        seen.append((paused(h), h.caller.pause_reason()))

    h.before_sleep = look
    with caplog.at_level(logging.ERROR, logger="connector.calls"):
        done = await outcomes(h, "e1", "e2", "e3")

    assert not any(isinstance(d, BaseException) for d in done), done
    assert h.delays == [PAUSE_PROBE_S] * 3  # one probe wait per try of the paused route
    value, reason = seen[0]
    assert value == 404
    assert reason is not None
    assert "route " in reason and "HTTP 404: Not Found" in reason and f"POST {PATH}" in reason
    assert "3 events in a row" in reason
    pauses = [r for r in caplog.records if "paused" in r.getMessage()]
    assert len(pauses) == 1  # logged once, not per failure or probe
    assert paused(h) == 0 and h.caller.pause_reason() is None
    assert [c.event_id for c in h.calls][:3] == ["e1", "e2", "e3"]


async def test_an_events_own_failure_among_successes_is_dead_lettered() -> None:
    """e1's 422 comes before the app's first success: it waits, is tried once more after
    e2's success, and its failure then is its own."""
    h = harness([http(422, "Validation error"), OK, http(422, "Validation error")])

    first, second = await outcomes(h, "e1", "e2")

    assert isinstance(first, EventRejected), first
    assert first.code == "http_422" and f"POST {PATH}" in first.reason
    assert not isinstance(second, BaseException)
    assert [c.event_id for c in h.calls] == ["e1", "e2", "e1"]
    assert h.caller.pause_reason() is None


async def test_a_held_event_is_counted_until_the_apps_first_success() -> None:
    h = harness([http(422, "Validation error"), OK, OK])
    held = asyncio.create_task(h.call("e1"))
    assert await stuck(held)
    assert h.sample("threads_connector_calls_held") == 1
    assert h.caller.pause_reason() is None  # one failure is no pause: readiness stays
    await h.call("e2")
    assert (await held).thread_uid == OK.thread_uid  # tried once more: it worked
    assert h.sample("threads_connector_calls_held") == 0


async def test_a_run_on_a_proven_app_dead_letters_at_most_the_setting_minus_one() -> None:
    """An app that worked, then a route's agent is deleted: threshold - 1 dead letters,
    then the route pauses and its next event waits for the probe."""
    h = harness([OK] + [http(404)] * 3 + [OK])
    await h.call("e0")
    dead = [await h.rejected_as(f"e{i}") for i in (1, 2)]
    assert [d.code for d in dead] == ["http_404", "http_404"]
    assert paused(h) is None or paused(h) == 0

    created = await h.call("e3")  # its 404 pauses the route; the probe succeeds

    assert created.thread_uid == OK.thread_uid
    assert h.delays == [PAUSE_PROBE_S]
    assert paused(h) == 0


async def test_a_different_answer_ends_a_pause_and_starts_its_own_run() -> None:
    systemic = Systemic(2, 1.0, AppMetrics(Metrics(), "demo-app"))
    gate = systemic.gate("orders/order.shipped")
    assert systemic.failure(gate, "e1", http(404), False) is Verdict.WAIT
    assert gate.is_open
    assert systemic.failure(gate, "e2", http(404), False) is Verdict.WAIT
    assert not gate.is_open and gate.status == 404
    assert gate.take_probe()
    assert systemic.failure(gate, "e1", http(404), True) is Verdict.WAIT
    assert not gate.is_open  # the same answer: still paused
    assert gate.take_probe()
    verdict = systemic.failure(gate, "e1", http(422), True)
    assert gate.is_open and gate.status is None
    assert verdict is Verdict.WAIT  # the app is not proven: e1 waits for a success
    systemic.success(gate, False)
    assert systemic.failure(gate, "e1", http(422), False) is Verdict.DEAD_LETTER


async def test_a_probe_whose_request_could_not_be_sent_lets_another_probe() -> None:
    """A paused route's probe event that cannot even form its request (no status: the
    event's own failure, dead-lettered) must not leave the route without a probe."""
    unsendable = PermanentApiError("request could not be sent: UnicodeEncodeError")
    h = harness([http(404)] * 3 + [unsendable, OK, OK, OK])
    calls = [asyncio.create_task(h.call(f"e{i}")) for i in range(3)]
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    codes = [d.code if isinstance(d, EventRejected) else "ok" for d in done]
    assert sorted(codes) == ["ok", "ok", "request_error"]
    assert h.caller.pause_reason() is None


async def test_distinct_events_make_a_run_not_one_events_retries() -> None:
    gate = RouteGate("r", threshold=2, probe_interval_s=1.0)
    assert not gate.failure("e1", http(404), False)
    assert not gate.failure("e1", http(404), False)
    assert gate.failure("e2", http(404), False)


async def test_a_2xx_without_a_thread_uid_is_never_held() -> None:
    """It may have created a thread: a retry could make a second one."""
    h = harness([PermanentApiError("201 without a threadUid in its body", status=201)])
    exc = await h.rejected()
    assert exc.code == "http_201"


async def test_stop_mode_dead_letters_a_2xx_without_a_thread_uid_and_stops() -> None:
    """``api.on_error: stop`` kept every erring event for a retry after the restart,
    this one too: the thread it may have created got a second one. Now it is
    dead-lettered (never retried, as in the other modes) and every call stops."""
    h = harness(
        [PermanentApiError("200 without a threadUid: the thread may exist", status=200), OK],
        on_error="stop",
    )
    async with asyncio.timeout(5):  # before, it waited for a restart
        exc = await h.rejected()
    assert exc.code == "http_200"
    reason = h.caller.pause_reason()
    assert reason is not None and reason.startswith("stopped (api.on_error=stop)")
    later = asyncio.create_task(h.call("e2"))
    assert await stuck(later)
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)


async def test_dead_letter_mode_dead_letters_every_one_and_never_pauses() -> None:
    h = harness([http(404)] * 5, on_error="dead_letter")
    dead = [await h.rejected_as(f"e{i}") for i in range(5)]
    assert {d.code for d in dead} == {"http_404"}
    assert h.caller.pause_reason() is None
    assert h.sample("threads_connector_calls_held") == 0


async def test_stop_mode_stops_every_call_at_the_first_error_and_keeps_the_event() -> None:
    h = harness([OK, http(422, "Validation error"), OK], on_error="stop")
    await h.call("e0")
    stopped = asyncio.create_task(h.call("e1"))
    assert await stuck(stopped)
    reason = h.caller.pause_reason()
    assert reason is not None and reason.startswith("stopped (api.on_error=stop)")
    assert "HTTP 422" in reason and f"POST {PATH}" in reason and "restart" in reason
    assert h.sample("threads_connector_api_stopped") == 1
    later = asyncio.create_task(h.call("e2"))
    assert await stuck(later)
    assert [c.event_id for c in h.calls] == ["e0", "e1"]  # no call since
    for task in (stopped, later):
        task.cancel()
    await asyncio.gather(stopped, later, return_exceptions=True)


async def test_calls_without_an_answer_trip_the_breaker_and_the_event_waits() -> None:
    """A black hole: every attempt times out. Before, the event was dead-lettered
    (retries_exhausted) after ``max_attempts``; now the breaker opens at its threshold
    and the event waits for the probe that gets an answer."""
    h = harness(
        [timeout()] * 6 + [OK],
        max_attempts=2,
        breaker_failure_threshold=2,
        breaker_probe_interval_s=3.0,
    )
    reasons: list[str | None] = []

    async def look(seconds: float) -> None:
        reasons.append(h.caller.pause_reason())

    h.before_sleep = look

    created = await h.call("e1")

    assert created.thread_uid == OK.thread_uid
    assert len(h.calls) == 7
    assert h.delays[1:] == [3.0] * 5  # after the breaker opened: the probe's waits
    assert all(r and "circuit breaker" in r and "no complete answer" in r for r in reasons[1:])
    assert h.caller.breaker.is_open


async def test_a_redirect_storm_opens_the_breaker_naming_the_redirect_and_path() -> None:
    """``api.base_url`` on http:// where the API redirects to https:// (307 each call):
    the breaker opens and /readyz says it is a redirect, with the path called. Before, it
    said only "(last: HTTP 307)": nothing pointed at api.base_url."""
    redirect = RetriableApiError(
        f"HTTP 307: redirected, not followed (is api.base_url right?) (POST {PATH})",
        status=307,
        kind="redirect",
        path=PATH,
    )
    h = harness([redirect] * 3 + [OK], breaker_failure_threshold=2)
    reasons: list[str | None] = []

    async def look(seconds: float) -> None:
        reasons.append(h.caller.pause_reason())

    h.before_sleep = look
    await h.call("e1")
    last = reasons[-1] or ""
    assert "circuit breaker open" in last
    assert "redirected, not followed (is api.base_url right?)" in last and f"POST {PATH}" in last


async def test_held_events_probe_the_app_one_at_a_time_until_it_is_proven() -> None:
    """Events held on an unproven app send one probe at a time (a request that cannot
    create a thread), at most one per ``pause_probe_interval_s``; once it proves the app
    every held event goes on. Before, nothing probed: a held event waited for the app's
    next success, for ever on a quiet app."""
    interval_s = 0.05
    proofs: list[bool] = []
    running = 0
    most = 0
    proven_after = 4

    async def prove() -> bool:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        proofs.append(len(proofs) + 1 >= proven_after)
        return proofs[-1]

    systemic = Systemic(20, interval_s, AppMetrics(Metrics(), "demo-app"), prove)
    gate = systemic.gate("*/order.shipped")
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(asyncio.gather(*(systemic.hold(gate) for _ in range(10))), 5)
    took_s = asyncio.get_running_loop().time() - started
    assert systemic.proven and systemic.held == 0
    assert proofs == [False, False, False, True]  # not one per held event
    assert most == 1
    assert took_s >= (proven_after - 1) * interval_s


def test_a_run_waits_for_the_routes_older_calls_and_their_success_breaks_it() -> None:
    """Events interleaved as bad, good, bad, bad (in the order their calls started); the
    404s come back at once, the success later. Before, the 404s paused the route (an
    ERROR line naming a configuration fault, /readyz red) until the success answered;
    now the run waits for the older call, and its success breaks the run."""
    gate = RouteGate("*/order.shipped", 3, PAUSE_PROBE_S)
    bad_1, good, bad_2, bad_3 = (gate.begin() for _ in range(4))
    for event_id, call in (("b1", bad_1), ("b2", bad_2), ("b3", bad_3)):
        assert not gate.failure(event_id, http(404), False, call)
    assert gate.is_open and gate.deciding  # its events wait for the older call
    assert not gate.success(False, good)
    assert gate.is_open and not gate.deciding


def test_an_event_tried_again_keeps_its_place_before_a_success() -> None:
    """Held events are tried again after the app's proof: their failures then come after
    every success of the fetch, but the events started before those successes, so they
    make no run. Before, 20 held events tried again after the last success paused the
    route under CPU load."""
    gate = RouteGate("*/order.shipped", 3, PAUSE_PROBE_S)
    firsts = {}
    for i in range(3):
        firsts[f"b{i}"] = gate.begin()
        gate.begin()  # a good event between
    assert not gate.success(False, gate._started)  # the last good one
    for event_id, first in firsts.items():  # tried again: a new call, the first's place
        assert not gate.failure(event_id, http(404), False, gate.begin(), first)
    assert gate.is_open and not gate.deciding


def test_a_run_pauses_once_the_older_calls_end_without_a_success() -> None:
    gate = RouteGate("*/order.shipped", 3, PAUSE_PROBE_S)
    older = gate.begin()
    for i in range(3):
        assert not gate.failure(f"bad-{i}", http(404), False, gate.begin())
    assert gate.ended(older)  # e.g. a 503 or a timeout: no success came
    assert not gate.is_open and gate.status == 404
    assert "3 events in a row answered HTTP 404" in gate.reason


async def test_a_probe_goes_at_once_when_another_answer_opens_its_gate() -> None:
    """A probe waits ``probe_interval_s`` before trying; when a call already under way
    answers meanwhile and opens the gate, the probe goes at once. Before, it slept on:
    after a brief pause its event (and its partition's commit) waited the whole interval
    (30 s for a route, 38 s instead of 8 s for the interleaved run of the review)."""
    h = harness([OK], breaker_probe_interval_s=30.0)
    h.caller._sleep = asyncio.sleep  # real time: the wait is what is measured
    h.caller.breaker.fail(False, "circuit breaker open: a test")
    task = asyncio.create_task(h.call("e1"))
    assert await stuck(task)
    h.caller.breaker.succeed(False)  # an answer to a call already under way
    async with asyncio.timeout(2):
        created = await task
    assert created.thread_uid == OK.thread_uid


def test_a_run_waiting_for_an_older_call_pauses_when_it_ends_with_another_4xx() -> None:
    """The older call a run waits for ends with another status (a 422 among 404s): the
    run is decided (no success came) and pauses the route. Checked only when the
    answer's own run was long enough, it waited for ever with its events held."""
    gate = RouteGate("*/order.shipped", 3, PAUSE_PROBE_S)
    older = gate.begin()
    for i in range(3):
        assert not gate.failure(f"bad-{i}", http(404), False, gate.begin())
    assert gate.failure("other", http(422, "Validation error"), False, older)
    assert gate.status == 404


async def test_a_run_that_outlasts_the_success_it_waited_for_pauses_then() -> None:
    """bad, good, bad, bad, bad (start order), threshold 3: the success breaks the run of
    the one bad event before it only; the three after it are a run, decided now that no
    older call is under way. Before, the run stayed ``deciding`` and its held events
    waited for another answer that might never come."""
    systemic = Systemic(3, PAUSE_PROBE_S, AppMetrics(Metrics(), "demo-app"))
    systemic.proven = True
    gate = systemic.gate("*/order.shipped")
    b1, good, b2, b3, b4 = (gate.begin() for _ in range(5))
    verdicts = [
        systemic.failure(gate, event_id, http(404), False, call)
        for event_id, call in (("b1", b1), ("b2", b2), ("b3", b3), ("b4", b4))
    ]
    assert verdicts[2:] == [Verdict.WAIT, Verdict.WAIT]  # deciding: they wait
    assert gate.is_open
    systemic.success(gate, False, good)
    assert not gate.is_open and gate.status == 404
