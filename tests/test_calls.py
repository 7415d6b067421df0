"""connector.calls: retries, backoff, Retry-After, the adaptive rate and the auth gate.

A fake attempt function plays a script of answers; sleeps are recorded and move a fake
clock shared with the token bucket and the adaptive rate, so nothing really waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from connector.calls import Abandoned, AuthGate, ThreadCaller, backoff_s
from connector.config import ApiSettings
from connector.errors import (
    ApiKeyInvalid,
    AuthError,
    EventRejected,
    PermanentApiError,
    RetriableApiError,
    Stage,
)
from connector.metrics import Metrics
from connector.ratelimit import AdaptiveRate, TokenBucket
from connector.routing import ThreadRequest
from connector.threads_client import ApiThread

PROBE_S = 5.0
REQUEST = ThreadRequest("demo-app", "agent-orders", "hello", "system", "humanUid", "h-1")
OK = ApiThread("th-1", "hu-1", "agent-orders")
Outcome = ApiThread | Exception
Hook = Callable[[float], Awaitable[None]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-9)  # like a real sleep, always lets some time pass
        await asyncio.sleep(0)


@dataclass
class Guard:
    calling: bool = False
    abandoned: bool = False


@dataclass
class Seen:
    """What the fake attempt saw at the moment it was made."""

    event_id: str
    gate_open: bool
    auth_paused: float | None
    calling: bool | None
    at: float  # the fake clock


@dataclass
class Harness:
    script: list[Outcome]
    api: dict[str, Any] = field(default_factory=dict)
    guard: Guard | None = None
    before_sleep: Hook | None = None  # runs as the caller starts a backoff or probe wait
    before_answer: Hook | None = None  # runs inside the attempt, before it answers

    def __post_init__(self) -> None:
        defaults: dict[str, Any] = {
            "max_attempts": 4,
            "backoff_initial_s": 0.5,
            "backoff_max_s": 30.0,
            "auth_probe_interval_s": PROBE_S,
        }
        self.settings = ApiSettings(**(defaults | self.api))
        self.clock = FakeClock()
        self.delays: list[float] = []
        self.calls: list[Seen] = []
        self.adaptive = AdaptiveRate(
            decrease_factor=self.settings.adaptive_decrease_factor,
            increase_per_s=self.settings.adaptive_increase_per_s,
            min_fraction=self.settings.adaptive_min_fraction,
            clock=self.clock,
        )
        self.bucket = TokenBucket(
            1_000_000.0, 1_000, clock=self.clock, sleep=self.clock.sleep, adaptive=self.adaptive
        )
        self.metrics = Metrics()
        self.caller = ThreadCaller(
            self.attempt,
            self.settings,
            self.bucket,
            self.adaptive,
            self.metrics,
            rng=random.Random(1234),
            sleep=self.sleep,
            auth_gate=AuthGate(self.settings.auth_probe_interval_s),
        )

    async def attempt(
        self, request: ThreadRequest, *, event_id: str, correlation_id: str
    ) -> ApiThread:
        assert request is REQUEST
        self.calls.append(
            Seen(
                event_id,
                self.caller.auth_gate.is_open,
                self.sample("threads_connector_auth_paused"),
                self.guard.calling if self.guard else None,
                self.clock.now,
            )
        )
        await asyncio.sleep(0)
        if self.before_answer is not None:
            await self.before_answer(0.0)
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.before_sleep is not None:
            await self.before_sleep(seconds)
        await self.clock.sleep(seconds)

    async def call(self, event_id: str = "evt-1") -> Any:
        return await self.caller.call(REQUEST, event_id, "corr-1", guard=self.guard)

    async def rejected(self) -> EventRejected:
        return await self.rejected_as("evt-1")

    async def rejected_as(self, event_id: str) -> EventRejected:
        with pytest.raises(EventRejected) as info:
            await self.call(event_id)
        return info.value

    def sample(self, name: str, **labels: str) -> float | None:
        """A sample of the caller's metrics; those labelled by app carry its label ("")."""
        with_app = labels | {"app": ""}
        value = self.metrics.registry.get_sample_value(name, with_app)
        return value if value is not None else self.metrics.registry.get_sample_value(name, labels)


def unavailable(status: int = 503, retry_after_s: float | None = None) -> RetriableApiError:
    return RetriableApiError(f"HTTP {status}", status=status, retry_after_s=retry_after_s)


def within_backoff(delays: Sequence[float], initial: float = 0.5, cap: float = 30.0) -> bool:
    return all(0 <= d <= min(cap, initial * 2**n) for n, d in enumerate(delays))


# -- success and retries -------------------------------------------------------------------


async def test_success_on_the_first_attempt() -> None:
    h = Harness([ApiThread("th-1", "hu-1", "")])

    created = await h.call()

    assert (created.thread_uid, created.human_uid) == ("th-1", "hu-1")
    assert created.agent_uid == "agent-orders"  # taken from the request when not echoed
    assert created.attempts == 1
    assert created.latency_ms >= 0
    assert h.delays == []
    assert h.caller.in_flight == 0
    assert h.sample("threads_connector_api_responses_total", status_class="2xx", code="201") == 1


async def test_retries_on_503_then_succeeds() -> None:
    h = Harness([unavailable(), unavailable(), OK])

    created = await h.call()

    assert created.attempts == 3
    assert len(h.calls) == 3
    assert len(h.delays) == 2
    assert within_backoff(h.delays)
    assert h.sample("threads_connector_api_retries_total", code="503") == 2
    assert h.sample("threads_connector_event_attempts_sum") == 3


async def test_gives_up_after_max_attempts() -> None:
    h = Harness([unavailable(502)] * 3, api={"max_attempts": 3})

    exc = await h.rejected()

    assert exc.stage is Stage.API
    assert exc.code == "retries_exhausted"
    assert exc.status == 502
    assert "3 attempts" in exc.reason
    assert len(h.calls) == 3
    assert len(h.delays) == 2  # no pointless wait after the last attempt


async def test_gives_up_when_the_wait_would_exceed_the_time_budget() -> None:
    h = Harness([unavailable(503, retry_after_s=120.0), OK], api={"retry_budget_s": 60.0})

    exc = await h.rejected()

    assert exc.code == "retries_exhausted"
    assert len(h.calls) == 1
    assert h.delays == []


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_permanent_error_is_not_retried(status: int) -> None:
    """Once the app's calls are proven (a success), a 4xx is the event's: dead-lettered at
    once (``connector.systemic`` holds it only before the first success)."""
    h = Harness([OK, PermanentApiError(f"HTTP {status}", status=status), OK])
    await h.call("evt-0")

    exc = await h.rejected()

    assert exc.stage is Stage.API
    assert exc.code == f"http_{status}"
    assert exc.status == status
    assert len(h.calls) == 2
    assert h.delays == []
    assert h.sample("threads_connector_event_attempts_count") == 2


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retry_after_is_the_minimum_delay(status: int) -> None:
    h = Harness([unavailable(status, retry_after_s=7.0), OK])

    await h.call()

    assert h.delays == [7.0]  # the first backoff is at most 0.5 s


async def test_retry_after_on_429_pauses_the_bucket_for_everyone() -> None:
    h = Harness([unavailable(429, retry_after_s=7.0), OK])
    pause_seen: list[float] = []

    async def look_at_the_bucket(seconds: float) -> None:
        pause_seen.append(h.bucket.try_acquire())  # paused: returns the wait, takes nothing

    h.before_sleep = look_at_the_bucket
    await h.call()

    assert pause_seen == [pytest.approx(7.0)]


async def test_backoff_is_used_when_it_exceeds_retry_after() -> None:
    h = Harness(
        [unavailable(503, retry_after_s=1.0), OK],
        api={"backoff_initial_s": 30.0, "backoff_max_s": 30.0},
    )
    await h.call()
    (delay,) = h.delays
    assert 1.0 <= delay <= 30.0
    assert delay != 1.0  # seeded jitter: the backoff drew more than Retry-After


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_lowers_the_adaptive_rate(status: int) -> None:
    h = Harness([unavailable(status), OK])

    await h.call()

    assert h.adaptive.factor == pytest.approx(h.settings.adaptive_decrease_factor)
    assert h.bucket.rate == pytest.approx(1_000_000.0 * h.settings.adaptive_decrease_factor)
    assert h.sample("threads_connector_rate_limited_total") == 1
    assert h.sample("threads_connector_rate_limit_per_second") == pytest.approx(h.bucket.rate)


@pytest.mark.parametrize("status", [502, 504])
async def test_other_retriable_errors_keep_the_rate(status: int) -> None:
    h = Harness([unavailable(status), OK])
    await h.call()
    assert h.adaptive.factor == 1.0
    assert h.sample("threads_connector_rate_limited_total") == 0


async def test_outcome_unknown_and_connect_errors_are_counted() -> None:
    h = Harness(
        [
            RetriableApiError("timeout", outcome_unknown=True),
            RetriableApiError("connection failed"),
            OK,
        ]
    )

    created = await h.call()

    assert created.attempts == 3
    assert h.sample("threads_connector_api_outcome_unknown_total") == 1
    assert h.sample("threads_connector_api_retries_total", code="timeout") == 1
    assert h.sample("threads_connector_api_retries_total", code="connect_error") == 1


# -- the auth gate -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_error_closes_the_gate_and_a_success_reopens_it(status: int) -> None:
    h = Harness([AuthError(f"HTTP {status}", status=status), OK])

    created = await h.call()

    assert [c.gate_open for c in h.calls] == [True, False]  # the second call is the probe
    assert [c.auth_paused for c in h.calls] == [0, 1]
    assert h.delays == [PROBE_S]
    assert h.caller.auth_gate.is_open
    assert h.sample("threads_connector_auth_paused") == 0
    assert created.attempts == 1  # the refused attempt is not counted


async def test_auth_pause_does_not_spend_the_attempt_budget() -> None:
    auth = AuthError("HTTP 401", status=401)
    h = Harness([auth, auth, auth, unavailable(), OK], api={"max_attempts": 2})

    created = await h.call()

    assert created.attempts == 2
    assert len(h.calls) == 5
    assert h.delays[:3] == [PROBE_S] * 3  # one probe wait per refused attempt
    assert h.caller.auth_gate.is_open


async def test_a_permanent_error_also_proves_the_key_is_accepted() -> None:
    h = Harness([OK, AuthError("HTTP 403", status=403), PermanentApiError("HTTP 422", status=422)])
    await h.call("evt-0")

    exc = await h.rejected()

    assert exc.code == "http_422"
    assert h.caller.auth_gate.is_open
    assert h.sample("threads_connector_auth_paused") == 0


async def test_auth_gate_has_one_probe_while_others_wait() -> None:
    gate = AuthGate(probe_interval_s=PROBE_S)
    assert await gate.enter() is False  # open: go

    assert gate.fail(was_probe=False) is True  # it was open
    assert gate.fail(was_probe=False) is False  # already closed
    assert not gate.is_open

    assert await gate.enter() is True  # the first caller becomes the probe
    waiter = asyncio.ensure_future(gate.enter())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()  # the others wait for the gate

    assert gate.succeed(was_probe=True) is True  # it was closed
    assert await asyncio.wait_for(waiter, timeout=1) is False
    assert gate.succeed(was_probe=False) is False  # already open


async def run_until_done(task: asyncio.Task[Any], spins: int = 200) -> bool:
    """Give the task event-loop turns (all its sleeps are fake); cancel it if still stuck."""
    for _ in range(spins):
        if task.done():
            return True
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def test_an_abandoned_probe_lets_another_caller_probe() -> None:
    first = Guard()
    h = Harness([AuthError("HTTP 401", status=401), OK], guard=first)

    async def abandon_during_probe_wait(seconds: float) -> None:
        first.abandoned = True  # the partition is revoked while the probe waits

    h.before_sleep = abandon_during_probe_wait
    with pytest.raises(Abandoned):
        await h.call("evt-1")
    assert not h.caller.auth_gate.is_open

    h.guard = None  # an event of another partition
    h.before_sleep = None
    task = asyncio.ensure_future(h.call("evt-2"))
    assert await run_until_done(task), "the gate stayed closed with nobody probing"
    assert task.result().thread_uid == "th-1"


async def test_a_cancelled_probe_lets_another_caller_probe() -> None:
    h = Harness([AuthError("HTTP 401", status=401), OK])
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def hang(seconds: float) -> None:
        await never

    h.before_sleep = hang
    probe = asyncio.ensure_future(h.call("evt-1"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(h.calls) == 1
    assert not h.caller.auth_gate.is_open
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe

    h.before_sleep = None
    task = asyncio.ensure_future(h.call("evt-2"))
    assert await run_until_done(task), "the gate stayed closed with nobody probing"


# -- abandonment, guards, concurrency ------------------------------------------------------


async def test_abandoned_before_an_attempt() -> None:
    h = Harness([OK], guard=Guard(abandoned=True))
    with pytest.raises(Abandoned):
        await h.call()
    assert h.calls == []


async def test_abandoned_while_waiting_to_retry() -> None:
    guard = Guard()
    h = Harness([unavailable(), OK], guard=guard)

    async def revoke(_: float) -> None:
        guard.abandoned = True  # revoked while the call was under way

    h.before_answer = revoke
    with pytest.raises(Abandoned):
        await h.call()
    assert len(h.calls) == 1
    assert h.delays == []


async def test_guard_says_when_a_call_is_under_way() -> None:
    guard = Guard()
    h = Harness([unavailable(), OK], guard=guard)
    await h.call()
    assert [c.calling for c in h.calls] == [True, True]
    assert guard.calling is False


async def test_in_flight_cap() -> None:
    h = Harness([OK] * 5, api={"max_in_flight": 2})
    release = asyncio.Event()
    running = 0
    peak = 0

    async def hold(_: float) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    h.before_answer = hold
    tasks = [asyncio.ensure_future(h.call(f"evt-{i}")) for i in range(5)]
    for _ in range(50):
        await asyncio.sleep(0)
    assert (running, h.caller.in_flight) == (2, 2)

    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert len(results) == 5
    assert peak == 2
    assert h.caller.in_flight == 0


async def test_calls_queued_for_a_slot_do_not_leave_together_over_the_rate() -> None:
    """All slots busy (the API is slow) while events keep coming: when the slow calls
    answer, the queued ones still go out one token apart. Were tokens taken before the
    slot, they would pile up in the queue and leave in one burst."""
    h = Harness([OK] * 8, api={"max_in_flight": 2})
    h.bucket.set_rate(10.0, burst=1)
    release = asyncio.Event()

    async def slow_first_two(_: float) -> None:
        if len(h.calls) <= 2:
            await release.wait()

    h.before_answer = slow_first_two
    tasks = [asyncio.ensure_future(h.call(f"evt-{i}")) for i in range(8)]
    for _ in range(200):
        await asyncio.sleep(0)
    assert len(h.calls) == 2
    h.clock.now += 30  # the slow calls take long; the queued events wait for slots

    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    sent_at = [seen.at for seen in h.calls[2:]]
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert len(gaps) == 5
    assert all(gap >= 0.1 - 1e-6 for gap in gaps), sent_at


# -- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 12])
def test_backoff_full_jitter_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    cap = min(30.0, 0.5 * 2 ** (attempt - 1))

    samples = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(500)]

    assert all(0.0 <= s <= cap for s in samples)
    assert min(samples) < 0.1 * cap  # full jitter reaches down to zero...
    assert max(samples) > 0.9 * cap  # ...and up to the exponential cap


# -- Retry-After cap -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_a_huge_retry_after_is_capped_logged_once_and_shown(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(
        [unavailable(status, retry_after_s=999_999.0), OK],
        api={"max_retry_after_s": 20.0, "max_pause_ready_s": 5.0},
    )
    seen: list[tuple[float | None, str | None]] = []

    async def look(seconds: float) -> None:
        seen.append((h.sample("threads_connector_api_paused_seconds"), h.caller.pause_reason()))

    h.before_sleep = look
    with caplog.at_level("WARNING", logger="connector.calls"):
        await h.call()

    assert h.delays == [20.0]
    ((paused, reason),) = seen
    assert paused == pytest.approx(20.0)
    assert reason is not None and "Retry-After" in reason
    assert h.caller.pause_reason() is None  # the pause is over
    pauses = [r for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(pauses) == 1
    assert "20s" in pauses[0].getMessage() and "999999" in pauses[0].getMessage()


async def test_a_short_pause_keeps_readiness() -> None:
    h = Harness([unavailable(429, retry_after_s=3.0), OK], api={"max_pause_ready_s": 5.0})
    reasons: list[str | None] = []

    async def look(seconds: float) -> None:
        reasons.append(h.caller.pause_reason())

    h.before_sleep = look
    await h.call()
    assert reasons == [None]


# -- the circuit breaker ---------------------------------------------------------------------


def refused() -> RetriableApiError:
    return RetriableApiError("connection failed: refused", kind="connect_error")


async def test_the_breaker_opens_pauses_and_spends_no_retry_budget() -> None:
    h = Harness(
        [refused(), refused(), refused(), unavailable(502), refused(), OK],
        api={"breaker_failure_threshold": 2, "max_attempts": 3, "breaker_probe_interval_s": 4},
    )
    states: list[tuple[float | None, str | None]] = []

    async def look(seconds: float) -> None:
        states.append((h.sample("threads_connector_api_breaker_open"), h.caller.pause_reason()))

    h.before_sleep = look
    created = await h.call()

    assert len(h.calls) == 6  # more failures than max_attempts, and no dead letter
    assert created.attempts == 2  # the first failure, then the probe that succeeded
    assert h.delays[1:] == [4.0] * 4  # after the breaker opened: probe waits only
    assert [open_ for open_, _ in states[1:]] == [1.0] * 4
    assert all("circuit breaker" in (reason or "") for _, reason in states[1:])
    assert h.caller.breaker.is_open
    assert h.sample("threads_connector_api_breaker_open") == 0
    assert h.caller.pause_reason() is None


@pytest.mark.parametrize(
    ("failure", "counts"),
    [
        (unavailable(502), True),
        (unavailable(500), True),
        (RetriableApiError("TLS failure", kind="tls_error"), True),
        (RetriableApiError("the proxy cannot be reached", kind="proxy_error"), True),
        (unavailable(503, retry_after_s=1.0), False),  # the API is up and says when
        (unavailable(429), False),
        # no answer (a black hole, headers then a stall, a drop mid-body): the API host's
        (RetriableApiError("timeout", outcome_unknown=True, kind="timeout"), True),
        (RetriableApiError("reset", outcome_unknown=True, kind="protocol_error"), True),
        (RetriableApiError("body", outcome_unknown=True, kind="body_too_large"), False),
    ],
)
async def test_what_trips_the_breaker(failure: RetriableApiError, counts: bool) -> None:
    h = Harness([failure, OK], api={"breaker_failure_threshold": 1})
    opened: list[bool] = []

    async def look(seconds: float) -> None:
        opened.append(not h.caller.breaker.is_open)

    h.before_sleep = look
    await h.call()
    assert opened == [counts]


async def test_waiting_calls_do_not_call_while_the_breaker_is_open() -> None:
    h = Harness(
        [refused(), OK, OK, OK],
        api={"breaker_failure_threshold": 1, "breaker_probe_interval_s": 4},
    )
    first = asyncio.ensure_future(h.call("evt-1"))
    while h.caller.breaker.is_open:
        await asyncio.sleep(0)
    others = [asyncio.ensure_future(h.call(f"evt-{i}")) for i in (2, 3)]
    results = await asyncio.gather(first, *others)
    assert [r.thread_uid for r in results] == ["th-1"] * 3
    # the probe went first; the two others only after it succeeded
    assert [c.event_id for c in h.calls][:2] == ["evt-1", "evt-1"]


# -- an API key that cannot be sent ----------------------------------------------------------


async def test_an_unusable_key_pauses_like_a_401_and_heals() -> None:
    source = "api.api_key_file (/run/secrets/key)"
    h = Harness([ApiKeyInvalid(f"the API key from {source} cannot be sent: it is empty"), OK])
    reasons: list[str | None] = []

    async def look(seconds: float) -> None:
        reasons.append(h.caller.pause_reason())

    h.before_sleep = look
    created = await h.call()

    assert created.attempts == 1
    assert h.delays == [PROBE_S]
    assert reasons[0] is not None and source in reasons[0]
    assert h.sample("threads_connector_auth_paused") == 0
    assert h.sample("threads_connector_api_key_invalid") == 0
    assert h.caller.breaker.consecutive == 0


async def test_calls_waiting_for_a_slot_are_not_counted_in_flight() -> None:
    """``calls_in_flight`` is the requests handed to the client; a call queued for a
    concurrency slot is ``calls_waiting``."""
    release = asyncio.Event()
    samples: list[tuple[float | None, float | None]] = []

    async def hold(_: float) -> None:
        samples.append(
            (
                h.sample("threads_connector_calls_in_flight"),
                h.sample("threads_connector_calls_waiting"),
            )
        )
        await release.wait()

    h = Harness([OK, OK, OK], api={"max_in_flight": 1}, before_answer=hold)
    calls = [asyncio.create_task(h.call(f"evt-{i}")) for i in range(3)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert samples == [(1.0, 2.0)]  # one on the wire, two queued for the slot
    release.set()
    await asyncio.gather(*calls)
    assert h.sample("threads_connector_calls_in_flight") == 0
    assert h.sample("threads_connector_calls_waiting") == 0


async def test_a_proxy_failure_names_itself_in_the_pause_reason() -> None:
    message = "the proxy refused the tunnel: HTTP 407 (proxy authentication required: check"
    h = Harness(
        [RetriableApiError(f"{message} api.proxy_auth_file)", kind="proxy_error"), OK],
        api={"breaker_failure_threshold": 1},
    )
    reasons: list[str | None] = []

    async def look(seconds: float) -> None:
        reasons.append(h.caller.pause_reason())

    h.before_sleep = look
    await h.call()
    assert reasons and message in (reasons[0] or ""), reasons


# -- the start-up probe's verdicts (connector.startup_checks) ------------------------------


async def test_a_start_up_404_holds_every_call_until_the_probe_passes() -> None:
    """The start-up gate gives no call the probe: with ``api.on_error: dead_letter`` a
    waiting event is neither sent nor dead-lettered; the probe's 400 sends it."""
    h = Harness([OK], api={"on_error": "dead_letter"})
    reason = "app a: POST /x answered 404: wrong path"
    h.caller.probe_refused(404, reason)
    assert h.caller.pause() == ("api_path", f"paused: start-up probe: {reason}")
    call = asyncio.ensure_future(h.call())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not call.done() and h.calls == []
    h.caller.probe_accepted()
    created = await call
    assert created.thread_uid == "th-1" and len(h.calls) == 1
    assert h.caller.pause() is None


async def test_a_start_up_401_closes_the_auth_gate_and_its_400_opens_it() -> None:
    h = Harness([])
    h.caller.probe_refused(401, "app a: POST /x answered 401: the API key is not accepted")
    paused = h.caller.pause()
    assert paused is not None and paused[0] == "api_key" and "401/403: HTTP 401" in paused[1]
    assert h.sample("threads_connector_auth_paused") == 1
    assert h.caller.breaker.consecutive == 0  # not a transport failure
    h.caller.probe_accepted()
    assert h.caller.pause() is None
    assert h.sample("threads_connector_auth_paused") == 0
