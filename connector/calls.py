"""The call policy: rate limit, concurrency cap, retries with backoff, the auth pause.

For each event: take a concurrency slot, then a token (last, so the request goes out the
moment it is granted: a token taken before queueing for a slot would let calls that
queued pile up and leave together, over the rate), make one attempt, give the slot back;
on a retriable failure wait (exponential backoff with full jitter, at least
``Retry-After``) *without* holding a slot, and go again until the attempt or time budget
is spent. 401/403 close a gate: every call waits while one probe retries periodically,
so a bad key never burns through the backlog; the key is re-read on each probe, so a
rotated secret file heals the connector without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from connector.config import ApiSettings
from connector.errors import (
    AuthError,
    EventRejected,
    PermanentApiError,
    RetriableApiError,
    Stage,
)
from connector.events import ThreadCreated
from connector.metrics import Metrics
from connector.ratelimit import AdaptiveRate, TokenBucket
from connector.routing import ThreadRequest
from connector.threads_client import ApiThread, status_class

log = logging.getLogger(__name__)
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")
Admit = Callable[[], Awaitable[None]]
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


class AuthGate:
    """Closed while the API answers 401/403. While closed, one caller at a time is the
    probe: it waits ``probe_interval_s`` and tries again; the others wait for the gate."""

    def __init__(self, probe_interval_s: float = 30.0) -> None:
        self.probe_interval_s = probe_interval_s
        self._closed = False
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return not self._closed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def enter(self) -> bool:
        """Wait until a call may go; True when this caller is the probe."""
        while self._closed:
            if not self._probing:
                self._probing = True
                return True
            await self._changed.wait()
        return False

    def fail(self, was_probe: bool) -> bool:
        """A 401/403: close the gate. True when it was open until now."""
        was_open = not self._closed
        self._closed = True
        self._end_probe(was_probe)
        return was_open

    def succeed(self, was_probe: bool) -> bool:
        """A call went through: open the gate. True when it was closed until now."""
        was_closed = self._closed
        self._closed = False
        self._end_probe(was_probe)
        return was_closed

    def _end_probe(self, was_probe: bool) -> None:
        if was_probe:
            self._probing = False
        self._notify()

    def abandon_probe(self) -> None:
        """The probe left without an answer (abandoned, cancelled): let another probe."""
        self._end_probe(True)


class ThreadCaller:
    """Turns a ThreadRequest into a ThreadCreated, or an EventRejected(stage=api)."""

    def __init__(
        self,
        attempt: Attempt,
        settings: ApiSettings,
        bucket: TokenBucket,
        adaptive: AdaptiveRate,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        auth_gate: AuthGate | None = None,
    ) -> None:
        self._attempt = attempt
        self._settings = settings
        self._bucket = bucket
        self._adaptive = adaptive
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self.auth_gate = auth_gate or AuthGate()
        self.in_flight = 0

    async def call(
        self,
        request: ThreadRequest,
        event_id: str,
        correlation_id: str,
        guard: CallGuard | None = None,
        admit: Admit | None = None,
    ) -> ThreadCreated:
        """Raise EventRejected(stage=api) when the API refuses or the budget runs out, and
        Abandoned when ``guard.abandoned`` is set before an attempt could start.
        ``admit`` is awaited in the concurrency slot before each attempt takes its token
        (the pipeline's duplicate-exposure gate)."""
        guard = guard or _NoGuard()
        started = time.monotonic()
        attempts = 0
        while True:
            is_probe = await self.auth_gate.enter()
            try:
                if is_probe:
                    await self._sleep(self.auth_gate.probe_interval_s)
                attempts += 1
                try:
                    thread = await self._one_attempt(
                        request, event_id, correlation_id, guard, admit
                    )
                except AuthError as exc:
                    attempts -= 1  # an auth pause is not the event's fault: no budget spent
                    if self.auth_gate.fail(is_probe):
                        self._metrics.auth_paused.set(1)
                        log.error(
                            "Threads API refused the API key (HTTP %s): calls paused, "
                            "probing every %.0fs",
                            exc.status,
                            self.auth_gate.probe_interval_s,
                        )
                    is_probe = False
                    continue
                except PermanentApiError as exc:
                    self._auth_ok(is_probe)  # any answer but 401/403: the key was accepted
                    is_probe = False
                    self._metrics.event_attempts.observe(attempts)
                    raise EventRejected(
                        Stage.API,
                        str(exc),
                        code=f"http_{exc.status}" if exc.status else "request_error",
                        status=exc.status,
                    ) from exc
                except RetriableApiError as exc:
                    self._auth_ok(is_probe)
                    is_probe = False
                    delay = self._retry_delay(exc, attempts, started)
                    if delay is None:
                        self._metrics.event_attempts.observe(attempts)
                        raise EventRejected(
                            Stage.API,
                            f"gave up after {attempts} attempts: {exc}",
                            code="retries_exhausted",
                            status=exc.status,
                        ) from exc
                    if guard.abandoned:
                        raise Abandoned(event_id) from exc
                    self._metrics.api_retries.labels(_code(exc)).inc()
                    await self._sleep(delay)
                    continue
                self._auth_ok(is_probe)
                is_probe = False
                self._metrics.event_attempts.observe(attempts)
                return ThreadCreated(
                    thread_uid=thread.thread_uid,
                    human_uid=thread.human_uid,
                    agent_uid=thread.agent_uid or request.agent_uid,
                    attempts=attempts,
                    latency_ms=(time.monotonic() - started) * 1000,
                )
            finally:
                if is_probe:  # left without an answer (abandoned, cancelled): hand it on
                    self.auth_gate.abandon_probe()

    async def _one_attempt(
        self,
        request: ThreadRequest,
        event_id: str,
        correlation_id: str,
        guard: CallGuard,
        admit: Admit | None = None,
    ) -> ApiThread:
        m = self._metrics
        async with self._slot():
            if admit is not None:
                await admit()
            if guard.abandoned:
                raise Abandoned(event_id)
            m.rate_limit_wait.inc(await self._counted(self._bucket.acquire()))
            if guard.abandoned:
                raise Abandoned(event_id)
            guard.calling = True
            self.in_flight += 1
            m.calls_in_flight.inc()
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
                m.calls_in_flight.dec()
        m.api_responses.labels("2xx", "201").inc()
        m.api_call_duration.labels("2xx").observe(time.monotonic() - t0)
        self._adaptive_update()
        return thread

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A concurrency slot; the wait for it counts in ``calls_waiting``."""
        await self._counted(self._slots.acquire())
        try:
            yield
        finally:
            self._slots.release()

    async def _counted(self, wait: Awaitable[T]) -> T:
        """``calls_waiting`` counts a call until its request is handed to the client;
        ``calls_in_flight`` only from then until it returns."""
        gauge = self._metrics.calls_waiting
        gauge.inc()
        try:
            return await wait
        finally:
            gauge.dec()

    def _auth_ok(self, was_probe: bool) -> None:
        if self.auth_gate.succeed(was_probe):
            self._metrics.auth_paused.set(0)
            log.warning("Threads API accepts the API key again: calls resumed")

    def _retry_delay(self, exc: RetriableApiError, attempts: int, started: float) -> float | None:
        s = self._settings
        if exc.status in OVERLOAD_STATUSES:
            self._adaptive.on_overload()
            self._metrics.rate_limited.inc()
            if exc.retry_after_s:
                self._bucket.pause_for(exc.retry_after_s)
            self._adaptive_update()
        delay = backoff_s(attempts, s.backoff_initial_s, s.backoff_max_s, self._rng)
        if exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        if attempts >= s.max_attempts or time.monotonic() - started + delay > s.retry_budget_s:
            return None
        return delay

    def _adaptive_update(self) -> None:
        self._metrics.rate_limit_rate.set(self._bucket.rate)


def _code(exc: RetriableApiError) -> str:
    if exc.status is not None:
        return str(exc.status)
    return "timeout" if exc.outcome_unknown else "connect_error"
