"""The call policy: rate limit, concurrency cap, retries with backoff, the auth pause.

For each event: take a concurrency slot, then a token (last, so the request goes out the
moment it is granted: a token taken before queueing for a slot would let calls that
queued pile up and leave together, over the rate), make one attempt, give the slot back;
on a retriable failure wait (exponential backoff with full jitter, at least
``Retry-After``) *without* holding a slot, and go again until the attempt or time budget
is spent. 401/403 (or a key that cannot be sent) close the auth gate, and lasting
transport failures (connection, TLS, 5xx storms) trip the circuit breaker: every call
waits while one probe retries periodically (``connector.gates``), so neither a bad key
nor an outage burns through the backlog, and waiting spends no retry budget; the key is
re-read on each probe, so a rotated secret file heals the connector without a restart.
Other 4xx answers go by ``api.on_error`` (``connector.systemic``): an event's own failure
is dead-lettered, a run of one status on a route pauses that route behind its own gate
(``pause``); every one is dead-lettered (``dead_letter``); or the first stops every call
(``stop``). ``Retry-After`` is capped at ``max_retry_after_s``; each new pause is logged
once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from connector.config import ApiSettings
from connector.errors import (
    ApiError,
    ApiKeyInvalid,
    AuthError,
    EventRejected,
    PermanentApiError,
    RetriableApiError,
    Stage,
)
from connector.events import ThreadCreated
from connector.gates import AuthGate, CircuitBreaker, Gate, StartupGate
from connector.metrics import AppMetrics, Metrics
from connector.ratelimit import AdaptiveRate, TokenBucket
from connector.routing import ThreadRequest
from connector.systemic import RouteGate, StopGate, Systemic, Verdict
from connector.threads_client import ApiThread, status_class

log = logging.getLogger(__name__)
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")
Admit = Callable[[], Awaitable[None]]
Release = Callable[[], None]
Probe = Callable[[], Awaitable[int]]  # the status of a request that cannot create a thread
OVERLOAD_STATUSES = frozenset({429, 503})


class Attempt(Protocol):
    """One HTTP attempt (``ThreadsClient.create_thread`` or a test double)."""

    def __call__(
        self, request: ThreadRequest, *, event_id: str, correlation_id: str
    ) -> Awaitable[ApiThread]: ...


class Abandoned(Exception):
    """The event's partition was revoked (or the connector is draining): stop here."""


class CallGuard(Protocol):
    """Per-event flags shared with the pipeline: is an HTTP attempt under way, and has the
    event been abandoned (no new attempt may start)."""

    calling: bool
    abandoned: bool


class _NoGuard:
    calling = False
    abandoned = False


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2^(attempt-1))]."""
    return rng.uniform(0.0, min(max_s, initial_s * 2 ** (attempt - 1)))


class ThreadCaller:
    """Turns a ThreadRequest into a ThreadCreated, or an EventRejected(stage=api)."""

    def __init__(
        self,
        attempt: Attempt,
        settings: ApiSettings,
        bucket: TokenBucket,
        adaptive: AdaptiveRate,
        metrics: Metrics | AppMetrics,
        *,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        auth_gate: AuthGate | None = None,
        breaker: CircuitBreaker | None = None,
        stop_gate: StopGate | None = None,
        probe: Probe | None = None,
        startup_gate: StartupGate | None = None,
    ) -> None:
        """``stop_gate``: shared by the apps (``api.on_error: stop`` stops every call);
        none given, the caller makes its own in that mode. ``probe``: a request of the
        app's that cannot create a thread, its status (``ThreadsClient.probe``): proves
        the app's path and key while events answered with a 4xx wait for that proof.
        ``startup_gate``: closed by the start-up probe (``connector.startup_checks``)."""
        self._attempt = attempt
        self._settings = settings
        self._bucket = bucket
        self._adaptive = adaptive
        # one app's caller: its metrics carry the app label (none given: the label is "")
        self._metrics = metrics if isinstance(metrics, AppMetrics) else AppMetrics(metrics, "")
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self.auth_gate = auth_gate or AuthGate(settings.auth_probe_interval_s)
        self.breaker = breaker or CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_probe_interval_s
        )
        # api.on_error: pause counts 4xx runs by route; stop closes the stop gate at the first
        self._probe = probe
        self.systemic = (
            Systemic(
                settings.pause_after_failures,
                settings.pause_probe_interval_s,
                self._metrics,
                self._prove if probe is not None else None,
            )
            if settings.on_error == "pause"
            else None
        )
        self.stop_gate = stop_gate or (StopGate() if settings.on_error == "stop" else None)
        self.startup_gate = startup_gate or StartupGate()
        self.in_flight = 0
        systemic = self.systemic
        self._metrics.calls_held.set_function(lambda: systemic.held if systemic else 0)
        # read when scraped, not written on each call (the gauge loop sets the rate too)
        self._metrics.api_paused_seconds.set_function(bucket.pause_remaining_s)
        self._metrics.calls_in_flight.set_function(lambda: self.in_flight)

    def pause_reason(self) -> str | None:
        """Why calls are paused for longer than readiness allows, or None."""
        paused = self.pause()
        return paused[1] if paused is not None else None

    def pause(self) -> tuple[str, str] | None:
        """``(category, reason)`` of ``pause_reason``; the category is one of
        ``metrics.NOT_READY_REASONS`` (a bounded label)."""
        if self.stop_gate is not None and not self.stop_gate.is_open:
            return "api_stopped", self.stop_gate.reason
        if not self.startup_gate.is_open:
            return "api_path", f"paused: {self.startup_gate.reason}"
        if not self.auth_gate.is_open:
            return "api_key", f"paused: {self.auth_gate.reason}"
        if not self.breaker.is_open:
            return "api_unreachable", f"paused: {self.breaker.reason}"
        left = self._bucket.pause_remaining_s()
        if left > self._settings.max_pause_ready_s:
            return "api_throttled", (
                f"paused {left:.0f}s more: the Threads API asked to wait (Retry-After)"
            )
        if self.systemic is not None and (paused := self.systemic.paused()):
            return "route_paused", "; ".join(gate.reason for gate in paused)
        return None

    # -- the start-up probe's verdicts (connector.startup_checks) ------------------------

    def probe_refused(self, status: int, reason: str) -> None:
        """The start-up probe was answered ``status``: 401/403 close the auth gate (as a
        call's would), 404/405 the start-up gate. Calls wait; nothing is dead-lettered."""
        if status in (401, 403):
            self._auth_refused(None, AuthError(reason, status=status))
        elif self.startup_gate.fail(False, f"start-up probe: {reason}"):
            log.error(
                "start-up probe: %s: calls paused until it passes",
                reason,
                extra={"app": self._metrics.app, "status": status},
            )

    def probe_accepted(self) -> None:
        """The start-up probe proves the path and the key: open both gates."""
        if self.startup_gate.succeed(False):
            log.warning("app %s: the start-up probe passes: calls resumed", self._metrics.app)
        self._key_accepted(None)

    async def call(
        self,
        request: ThreadRequest,
        event_id: str,
        correlation_id: str,
        guard: CallGuard | None = None,
        admit: Admit | None = None,
        release: Release | None = None,
    ) -> ThreadCreated:
        """Raise EventRejected(stage=api) when the API refuses or the budget runs out, and
        Abandoned when ``guard.abandoned`` is set before an attempt could start.
        ``admit`` is awaited in the concurrency slot before each attempt takes its token
        (the pipeline's duplicate-exposure gate); ``release`` gives that unit back when
        the event waits after a 4xx (no thread exists: a paused route's events must not
        hold the exposure every other route needs)."""
        guard = guard or _NoGuard()
        systemic = self.systemic
        route = systemic.gate(request.route) if systemic is not None else None
        started = time.monotonic()
        paused_s = 0.0  # spent at a closed gate: not the event's retry budget
        attempts = 0
        first = 0  # the route's start order of this event's first call: its place in a run
        while True:
            waited_from = time.monotonic()
            probe = await self._pass_gates(route)
            route_probe = probe is not None and probe is route  # settled by an answer
            call = 0
            try:
                if probe is not None:
                    await self._probe_wait(probe)
                paused_s += time.monotonic() - waited_from
                attempts += 1
                # its place in the route's start order: a run of 4xx waits for older calls
                call = route.begin() if route is not None else 0
                first = first or call
                try:
                    thread = await self._one_attempt(
                        request, event_id, correlation_id, guard, admit
                    )
                except AuthError as exc:
                    attempts -= 1  # an auth pause is not the event's fault: no budget spent
                    # a 401/403 is an answer (the API is up); an unusable key sent nothing
                    self._breaker_settle(probe, ok=not isinstance(exc, ApiKeyInvalid))
                    self._auth_refused(probe, exc)
                    probe = None
                    continue
                except PermanentApiError as exc:
                    self._answered(probe)  # any answer but 401/403: the key was accepted
                    probe = None
                    if systemic is not None and route is not None and exc.status is not None:
                        was_probe, route_probe = route_probe, False  # its answer settles it
                        verdict = systemic.failure(route, event_id, exc, was_probe, call, first)
                        call = 0
                        if verdict is Verdict.WAIT:
                            attempts -= 1  # the route's fault, or not decided yet
                            if release is not None:
                                release()
                            waited_from = time.monotonic()
                            await systemic.hold(route)
                            paused_s += time.monotonic() - waited_from
                            continue
                    rejected = EventRejected(
                        Stage.API,
                        str(exc),
                        code=f"http_{exc.status}" if exc.status else "request_error",
                        status=exc.status,
                    )
                    # a 2xx without a threadUid may have made a thread: stop, but never
                    # keep it for a retry after the restart (a second thread)
                    may_exist = exc.status is not None and 200 <= exc.status < 300
                    if self._stopping(rejected, request) and not may_exist:
                        attempts -= 1
                        continue
                    self._metrics.event_attempts.observe(attempts)
                    raise rejected from exc
                except RetriableApiError as exc:
                    if exc.transport_failure:
                        self._transport_failed(probe, exc)
                        probe = None
                        if not self.breaker.is_open:
                            attempts -= 1  # the outage is not the event's fault
                            continue
                    else:
                        self._answered(probe, breaker=exc.status is not None)
                        probe = None
                    delay = self._retry_delay(exc, attempts, started + paused_s)
                    if delay is None:
                        rejected = EventRejected(
                            Stage.API,
                            f"gave up after {attempts} attempts: {exc}",
                            code="retries_exhausted",
                            status=exc.status,
                        )
                        if self._stopping(rejected, request):
                            attempts -= 1
                            continue
                        self._metrics.event_attempts.observe(attempts)
                        raise rejected from exc
                    if guard.abandoned:
                        raise Abandoned(event_id) from exc
                    self._metrics.api_retries.labels(_code(exc)).inc()
                    await self._sleep(delay)
                    continue
                self._answered(probe)
                probe = None
                if systemic is not None and route is not None:
                    systemic.success(route, route_probe, call, first)
                    route_probe, call = False, 0
                self._metrics.event_attempts.observe(attempts)
                return ThreadCreated(
                    thread_uid=thread.thread_uid,
                    human_uid=thread.human_uid,
                    agent_uid=thread.agent_uid or request.agent_uid,
                    attempts=attempts,
                    latency_ms=(time.monotonic() - started) * 1000,
                )
            finally:
                if call and systemic is not None and route is not None:
                    systemic.ended(route, call)  # no verdict on the route: a run may be due
                if probe is not None:  # left without an answer (abandoned, cancelled)
                    probe.abandon_probe()
                elif route_probe and route is not None:  # an answer that says nothing of it
                    route.abandon_probe()

    async def _probe_wait(self, probe: Gate) -> None:
        """The probe's wait before it tries, cut short when the gate opens meanwhile (an
        answer to a call already under way): waiting on would hold its event, and its
        partition's commit, for nothing."""
        sleeping = asyncio.ensure_future(self._sleep(probe.probe_interval_s))
        opened = asyncio.ensure_future(_until_open(probe))
        try:
            await asyncio.wait((sleeping, opened), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            opened.cancel()

    async def _prove(self) -> bool:
        """Whether the app's path and key work, by a request that cannot create a thread
        (400 or 422 to an invalid body), under the rate limit like any call."""
        if self._probe is None:
            return False
        if not self._bucket.take_now():
            await self._bucket.acquire()
        try:
            status = await self._probe()
        except ApiError:
            return False  # no answer: nothing proven
        self._metrics.api_responses.labels(status_class(status), str(status)).inc()
        return status in (400, 422)

    async def _pass_gates(self, route: RouteGate | None = None) -> Gate | None:
        """Wait until every gate is open, or this caller is the probe of a closed one."""
        gates: tuple[Gate, ...] = (self.startup_gate, self.auth_gate, self.breaker)
        if self.stop_gate is not None:
            gates = (self.stop_gate, *gates)
        if route is not None:
            gates = (*gates, route)
        while True:
            for gate in gates:
                if not gate.is_open:
                    if gate.take_probe():
                        return gate
                    await gate.changed()
                    break
            else:
                return None

    async def _one_attempt(
        self,
        request: ThreadRequest,
        event_id: str,
        correlation_id: str,
        guard: CallGuard,
        admit: Admit | None = None,
    ) -> ApiThread:
        m = self._metrics
        slots = self._slots
        if slots.locked():  # a wait: counted in ``calls_waiting``
            await self._counted(slots.acquire())
        else:
            await slots.acquire()
        try:
            if admit is not None:
                await admit()
            if guard.abandoned:
                raise Abandoned(event_id)
            if not self._bucket.take_now():
                m.rate_limit_wait.inc(await self._counted(self._bucket.acquire()))
            if guard.abandoned:
                raise Abandoned(event_id)
            guard.calling = True
            self.in_flight += 1
            t0 = time.monotonic()
            try:
                thread = await self._attempt(
                    request, event_id=event_id, correlation_id=correlation_id
                )
            except RetriableApiError as exc:
                code = _code(exc)
                klass = status_class(exc.status) if exc.status else "error"
                m.api_responses.labels(klass, code).inc()
                m.api_call_duration.labels(klass).observe(time.monotonic() - t0)
                if exc.outcome_unknown:
                    m.api_outcome_unknown.inc()
                    log.warning(
                        "outcome unknown, a thread may exist",
                        extra={"event_id": event_id, "correlation_id": correlation_id},
                    )
                raise
            except (PermanentApiError, AuthError) as exc:
                klass = status_class(exc.status) if exc.status else "error"
                code = str(exc.status) if exc.status else "request_error"
                m.api_responses.labels(klass, code).inc()
                m.api_call_duration.labels(klass).observe(time.monotonic() - t0)
                raise
            finally:
                guard.calling = False
                self.in_flight -= 1
        finally:
            slots.release()
        m.api_responses.labels("2xx", str(thread.status)).inc()
        m.api_call_duration.labels("2xx").observe(time.monotonic() - t0)
        return thread

    async def _counted(self, wait: Awaitable[T]) -> T:
        """``calls_waiting`` counts a call until its request is handed to the client;
        ``calls_in_flight`` only from then until it returns."""
        gauge = self._metrics.calls_waiting
        gauge.inc()
        try:
            return await wait
        finally:
            gauge.dec()

    def _answered(self, probe: Gate | None, *, breaker: bool = True) -> None:
        """The API answered (not 401/403): the key is good; with ``breaker`` the API is
        reachable too (an answer without a status, e.g. a timeout, says nothing of it)."""
        self._key_accepted(probe)
        self._breaker_settle(probe, ok=True if breaker else None)

    def _key_accepted(self, probe: Gate | None) -> None:
        if self.auth_gate.succeed(probe is self.auth_gate):
            self._metrics.auth_paused.set(0)
            self._metrics.api_key_invalid.set(0)
            log.warning("Threads API accepts the API key again: calls resumed")

    def _breaker_settle(self, probe: Gate | None, *, ok: bool | None) -> None:
        if ok and self.breaker.succeed(probe is self.breaker):
            self._metrics.api_breaker_open.set(0)
            log.warning("Threads API reachable again: circuit breaker closed, calls resumed")
        elif not ok and probe is self.breaker:
            self.breaker.abandon_probe()

    def _auth_refused(self, probe: Gate | None, exc: AuthError) -> None:
        if isinstance(exc, ApiKeyInvalid):
            reason = str(exc)  # names where the key was read, never the key
            self._metrics.api_key_invalid.set(1)
        else:
            reason = f"the Threads API refuses the API key (401/403: HTTP {exc.status})"
            self._metrics.api_key_invalid.set(0)
        if self.auth_gate.fail(probe is self.auth_gate, reason):
            self._metrics.auth_paused.set(1)
            log.error(
                "%s: calls paused, probing every %.0fs",
                reason,
                self.auth_gate.probe_interval_s,
                extra={"app": self._metrics.app},
            )

    def _stopping(self, rejected: EventRejected, request: ThreadRequest) -> bool:
        """``api.on_error: stop``: stop every call at the first API error (the event is
        kept: it waits with the others). True when stopped."""
        gate = self.stop_gate
        if gate is None:
            return False
        reason = f"app {self._metrics.app} route {request.route}: {rejected.reason}"
        if gate.stop(reason):
            self._metrics.api_stopped.set(1)
            log.error("%s: every call stops until a restart", gate.reason)
        return True

    def _transport_failed(self, probe: Gate | None, exc: RetriableApiError) -> None:
        if probe is self.auth_gate:  # no answer: nothing learnt about the key
            self.auth_gate.abandon_probe()
        if exc.kind == "redirect":
            what = str(exc)  # says to check api.base_url, with the path called
        elif exc.status is not None:
            what = f"HTTP {exc.status}"
        elif exc.kind in ("timeout", "protocol_error", "proxy_error"):
            # e.g. no complete answer within 10s; the proxy's words say what to fix
            what = f"{exc.kind}: {exc}"
        else:
            what = exc.kind or "error"
        reason = (
            f"circuit breaker open: the Threads API failed {self.breaker.consecutive + 1} "
            f"times in a row (last: {what})"
        )
        if self.breaker.failure(probe is self.breaker, reason):
            self._metrics.api_breaker_open.set(1)
            log.error(
                "%s: calls paused, probing every %.0fs: %s",
                reason,
                self.breaker.probe_interval_s,
                exc,
            )

    def _retry_delay(self, exc: RetriableApiError, attempts: int, started: float) -> float | None:
        s = self._settings
        retry_after = exc.retry_after_s
        if retry_after is not None:
            retry_after = min(retry_after, s.max_retry_after_s)
        if exc.status in OVERLOAD_STATUSES:
            self._adaptive.on_overload()
            self._metrics.rate_limited.inc()
            if retry_after:
                self._pause(retry_after, exc)
            self._adaptive_update()
        delay = backoff_s(attempts, s.backoff_initial_s, s.backoff_max_s, self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if attempts >= s.max_attempts or time.monotonic() - started + delay > s.retry_budget_s:
            return None
        return delay

    def _pause(self, seconds: float, exc: RetriableApiError) -> None:
        """Pause every call of this replica; log a pause once (not each answer that
        asks for the same one)."""
        before = self._bucket.pause_remaining_s()
        self._bucket.pause_for(seconds)
        if seconds > before + 1.0:
            asked = exc.retry_after_s or 0.0
            capped = (
                f" (asked {asked:.0f}s, capped by api.max_retry_after_s)" if asked > seconds else ""
            )
            log.warning(
                "Threads API answered HTTP %s with Retry-After: calls paused %.0fs%s",
                exc.status,
                seconds,
                capped,
            )

    def _adaptive_update(self) -> None:
        self._metrics.rate_limit_rate.set(self._bucket.rate)


async def _until_open(gate: Gate) -> None:
    while not gate.is_open:
        await gate.changed()


def _code(exc: RetriableApiError) -> str:
    if exc.status is not None:
        return str(exc.status)
    if exc.kind:
        return exc.kind
    return "timeout" if exc.outcome_unknown else "connect_error"
