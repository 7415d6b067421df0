"""Systemic API failures: one event's 4xx is dead-lettered, a run of them pauses a route.

A 4xx says the request was wrong, not whether the event or the configuration made it so:
a wrong ``api.base_url`` answers 404 to every call, a route's agent that does not exist
404 to each of its events, a template that renders an invalid body 422 to each. Dead-
lettering each would drain the backlog into the dead-letter topic while the pod looks
healthy. So, for ``api.on_error: pause`` (the default), per app:

- **An app's calls are proven by a success** (its path and key work), or by a probe that
  cannot create a thread (``ThreadsClient.probe``: an invalid body, which the API answers
  400 after the path and the key; a wrong path answers 404 to it too). Until then, an
  event answered with a 4xx is *held*, not dead-lettered: while events are held, one of
  them sends that probe every ``api.pause_probe_interval_s``; the event waits for the
  app's proof (then it is tried once more, and a failure then is its own) or for its
  route to pause (then it waits with the route's other events). Without the probe, an
  app's lone event failing on its own waited for the app's next success, for ever on a
  quiet app, and its partition's commit, then the whole buffer, with it.
- **A run pauses a route** (``RouteGate``). ``api.pause_after_failures`` distinct events
  of one route answered with the same status, with no success of the route in between,
  is a configuration fault: the route's calls wait, readiness names the app, the route,
  the status and the URL path called, one line is logged, and one of its events probes
  every ``api.pause_probe_interval_s``. A success reopens it; so does a different answer
  (what caused the pause is gone; that answer starts a run of its own). A pause makes the
  app unproven again, so its other routes hold their failures too.
- So a run dead-letters nothing on an app not proven yet (the wrong-path case at start),
  and at most ``pause_after_failures - 1`` events on a proven one (an agent deleted while
  running). A 2xx without a ``threadUid`` may have created a thread: it counts toward a
  run but is never held for a retry (that could make a second thread).

A held event is waiting like one at a closed gate: it spends no retry budget, and a
revocation or a drain cancels it (its offset stays uncommitted; the next owner replays it).
Transport failures (no answer, TLS, 5xx) are the circuit breaker's and 401/403 the auth
gate's (``connector.gates``): neither is an event's fault in any mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from connector.errors import PermanentApiError
from connector.gates import Gate
from connector.metrics import AppMetrics

log = logging.getLogger(__name__)

# True when a request that cannot create a thread proves the app's path and key work
Prove = Callable[[], Awaitable[bool]]


class Verdict(Enum):
    """What a 4xx answer means for its event."""

    DEAD_LETTER = "dead_letter"  # the event's own failure
    WAIT = "wait"  # not decided, or the route is paused: wait, then try again


class RouteGate(Gate):
    """One route's calls: open, or paused by a run of one status (``status``).

    "No success between" is judged in the order the events' calls *started* (an event
    keeps the place of its first attempt when it tries again): a success breaks the run
    for the failures of events that started before it, whenever their answers came
    back, and 4xx answers do not pause the route while a call of it started before them
    is still under way. Until those answer, the run is ``deciding`` and its failing
    events wait."""

    def __init__(self, route: str, threshold: int, probe_interval_s: float) -> None:
        super().__init__(probe_interval_s)
        self.route = route
        self.threshold = threshold
        self.status: int | None = None  # the status that paused it
        # failing events since a success, by status: event id -> its place in start order
        self._runs: dict[int | None, dict[str, int]] = {}
        self._last: dict[int | None, PermanentApiError] = {}  # a run's last answer
        self._started = 0
        self._succeeded = 0  # the latest place in start order of a success
        self._calls: set[int] = set()  # the route's calls under way, in start order

    def begin(self) -> int:
        """A call of the route starts: its place in start order (for ``end``)."""
        self._started += 1
        self._calls.add(self._started)
        return self._started

    @property
    def deciding(self) -> bool:
        """A run is long enough to pause, but older calls of the route are under way."""
        runs = self._runs  # empty but for a run: no generator on the hot path
        return bool(runs) and any(len(run) >= self.threshold for run in runs.values())

    def _clear(self) -> None:
        self._runs.clear()
        self._last.clear()

    def success(self, was_probe: bool, call: int = 0, order: int = 0) -> bool:
        """A call of the route went through (``order``: its event's place in start
        order, ``call`` by default). True when it was paused until now."""
        self._calls.discard(call)
        order = order or call
        if order > self._succeeded:
            self._succeeded = order
        if self._runs:
            self._drop_before(order)
        if not self._closed and not was_probe:
            return False  # the common case, once per call: nothing to wake
        self.status = None
        return self.succeed(was_probe)

    def _drop_before(self, order: int) -> None:
        """A success breaks the runs of the events that started before it."""
        for status in list(self._runs):
            run = {e: o for e, o in self._runs[status].items() if o > order}
            if run:
                self._runs[status] = run
            else:
                del self._runs[status]
                self._last.pop(status, None)

    def failure(
        self,
        event_id: str,
        exc: PermanentApiError,
        was_probe: bool,
        call: int = 0,
        order: int = 0,
    ) -> bool:
        """Count one event's failure; True when it pauses the route now."""
        self._calls.discard(call)
        order = order or call
        if self._closed:
            if exc.status == self.status:
                self.fail(was_probe)  # still the same: stays paused, the probe ends
                return False
            self.succeed(was_probe)  # another answer: what paused it is gone
            self.status = None
            self._clear()
        if not order or order > self._succeeded:  # else a success started after it
            self._runs.setdefault(exc.status, {})[event_id] = order
            self._last[exc.status] = exc
        if not self.deciding:
            return False  # the common case: no run is long enough
        due = self._due()  # this answer's run, or one that waited for this call
        return due is not None and self._pause(due, was_probe)

    def ended(self, call: int) -> bool:
        """A call ended without a verdict on the route (no answer, 401/403, 429, 5xx,
        abandoned): True when a run that waited for it pauses the route now."""
        self._calls.discard(call)
        if self._closed or not self._runs:
            return False
        due = self._due()
        return due is not None and self._pause(due, False)

    def _due(self) -> int | None:
        """The status of a run that pauses the route now, or None."""
        for status, run in self._runs.items():
            if len(run) >= self.threshold:
                newest = max(run.values())
                if not any(call < newest for call in self._calls):
                    return status
        return None

    def _pause(self, status: int | None, was_probe: bool) -> bool:
        count, exc = len(self._runs[status]), self._last[status]
        self._clear()
        self.status = status
        reason = (
            f"route {self.route} paused: {count} events in a row answered {exc}, with no "
            f"success between (a configuration fault? api.base_url, the route's agent_uid "
            f"or templates); its events wait, one probes every {self.probe_interval_s:g}s"
        )
        return self.fail(was_probe, reason)


class StopGate(Gate):
    """``api.on_error: stop``: closed at the first API error, for good (no probe): every
    call waits, nothing is dead-lettered, until the process restarts."""

    def take_probe(self) -> bool:
        return False

    def stop(self, reason: str) -> bool:
        """Close for good. True when it was open until now."""
        return self.fail(False, f"stopped (api.on_error=stop): {reason}; restart to retry")


class Systemic:
    """One app's route gates, and whether its calls are proven to work. Each pause and
    resume is logged once and shown by ``route_paused_status{app,route}``."""

    def __init__(
        self,
        threshold: int,
        probe_interval_s: float,
        metrics: AppMetrics,
        prove: Prove | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.probe_interval_s = probe_interval_s
        self.proven = False
        self.held = 0  # events waiting for a verdict (a gauge)
        self._metrics = metrics
        self._routes: dict[str, RouteGate] = {}
        self._changed = asyncio.Event()
        self._prove = prove
        self._proving = False
        self._next_proof = 0.0  # when a held event may send the next probe
        self._clock = clock

    def gate(self, route: str) -> RouteGate:
        gate = self._routes.get(route)
        if gate is None:
            gate = self._routes[route] = RouteGate(route, self.threshold, self.probe_interval_s)
        return gate

    def paused(self) -> list[RouteGate]:
        return [gate for gate in self._routes.values() if not gate.is_open]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def success(self, gate: RouteGate, was_probe: bool, call: int = 0, order: int = 0) -> None:
        """A call of the route went through (``call``: from ``gate.begin()``; ``order``:
        the event's first call's)."""
        if not self.proven:
            self.proven = True
            self._notify()
        status = gate.status
        deciding = gate.deciding
        if gate.success(was_probe, call, order) and status is not None:
            self._resumed(gate, f"route {gate.route} of app %s answers again: calls resumed")
        elif deciding:
            if gate.ended(0):  # the rest of the run started after it: decided now
                self._paused(gate)
            else:
                self._notify()  # the run that waited is broken: its events go on

    def failure(
        self,
        gate: RouteGate,
        event_id: str,
        exc: PermanentApiError,
        was_probe: bool,
        call: int = 0,
        order: int = 0,
    ) -> Verdict:
        """The verdict on one event's 4xx (counted toward its route's run)."""
        status = gate.status
        tripped = gate.failure(event_id, exc, was_probe, call, order)
        if status is not None and gate.status != status:
            self._resumed(gate, f"route {gate.route} of app %s no longer answers HTTP {status}")
        if tripped:
            self._paused(gate)
        may_exist = exc.status is not None and 200 <= exc.status < 300
        if may_exist:  # a thread may exist: never retried
            return Verdict.DEAD_LETTER
        if not gate.is_open or not self.proven or gate.deciding:
            return Verdict.WAIT
        return Verdict.DEAD_LETTER

    def ended(self, gate: RouteGate, call: int) -> None:
        """A call of the route ended without a verdict on it (see ``RouteGate.ended``)."""
        if gate.ended(call):
            self._paused(gate)

    def _paused(self, gate: RouteGate) -> None:
        self.proven = False
        self._notify()
        self._metrics.route_paused_status(gate.route).set(gate.status or 0)
        log.error(
            "app %s: %s",
            self._metrics.app,
            gate.reason,
            extra={"app": self._metrics.app, "route": gate.route, "status": gate.status},
        )

    def _resumed(self, gate: RouteGate, message: str) -> None:
        self._metrics.route_paused_status(gate.route).set(0)
        log.warning(message, self._metrics.app, extra={"app": self._metrics.app})

    async def hold(self, gate: RouteGate) -> None:
        """Wait until the app is proven and its route's run decided, or the route paused
        (then try again). One held event at a time probes the app's path and key, every
        ``probe_interval_s``."""
        self.held += 1
        try:
            while gate.is_open and (not self.proven or gate.deciding):
                wait_s: float | None = None  # until something changes
                if not self.proven and self._prove is not None and not self._proving:
                    wait_s = self._next_proof - self._clock()
                    if wait_s <= 0:
                        await self._try_proof(self._prove)
                        continue
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await changed.wait()
        finally:
            self.held -= 1

    async def _try_proof(self, prove: Prove) -> None:
        self._proving = True
        try:
            proven = await prove()
        finally:
            self._proving = False
            self._next_proof = self._clock() + self.probe_interval_s
            self._notify()  # a cancelled prover hands the probe over
        if proven and not self.proven:
            self.proven = True
            self._notify()
            log.info(
                "app %s: a probe proves its path and key (HTTP 400 to an invalid body): "
                "events answered with a 4xx are tried once more, then dead-lettered",
                self._metrics.app,
                extra={"app": self._metrics.app},
            )
