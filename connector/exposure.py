"""The duplicate-exposure gate: how many threads may exist whose results are not committed.

A thread created by the API is only safe once its result is committed: a crash before that
replays its event, and the replay creates a second thread. Calls in flight are not the only
exposure, then: every created thread waiting for a commit counts too, and while the broker
is down nothing commits, so a connector that keeps calling piles up exposure without bound.

``Exposure`` holds one unit per call started (taken in the concurrency slot before the
first token; then on the wire, retrying, or done with a thread whose result waits for a
commit), at most ``cap`` in all. A unit is given back when the call ends without a thread
(the API refused it, the event was abandoned) or when the commit cycle that carries its
result succeeds. No call starts while:

- a commit cycle failed (a session that ended on a failed commit hands the next one a
  closed gate, ``healthy=False``: its first cycle must prove the broker is back);
- a commit cycle is *overdue*: running longer than ``OVERDUE_FACTOR`` times the typical
  cycle (an average of the recent successful ones), at least ``OVERDUE_FLOOR_S`` and at
  most ``stall_s`` (the first cycle, with nothing measured yet, gets ``stall_s``). Calls
  went on for ``stall_s`` (5 s) after commits stopped before: a broker outage or a CPU
  stall piled up 590-860 created threads that a crash then duplicated;
- the threads created and waiting for a commit (the *uncommitted window*) are more than
  ``WINDOW_FACTOR`` cycles' worth of results (at least ``WINDOW_FLOOR``): what the window
  holds in a steady flow is about two cycles' worth (the cycle being committed and the
  results finished meanwhile); more means commits fell behind the calls. A cycle's worth
  is the larger of the average and the last cycle: the average alone, held down by the
  cap itself, grew about 1.1 times a cycle, and with 1 s cycles a start took over 30 s to
  reach the calls' pace; the last cycle lets the flow double each cycle.

Calls already under way finish; calls resume when the cycle ends (or a later one
succeeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

OVERDUE_FACTOR = 4.0
OVERDUE_FLOOR_S = 0.25
WINDOW_FACTOR = 3.0
WINDOW_FLOOR = 64
SMOOTHING = 0.2  # weight of the newest cycle in the averages


class Exposure:
    """Counts and caps the calls started whose results are not committed yet."""

    def __init__(
        self,
        cap: int,
        stall_s: float,
        *,
        healthy: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.stall_s = stall_s
        self.healthy = healthy  # the last commit cycle succeeded
        self.held = 0
        self.created = 0  # threads created whose results are not committed (the window)
        self._clock = clock
        self._cycle_started: float | None = None
        self._cycle_s: float | None = None  # average duration of a successful cycle
        self._per_cycle = 0.0  # average results per successful cycle
        self._last_cycle = 0  # results of the last successful cycle
        self._changed = asyncio.Event()

    @property
    def overdue_s(self) -> float:
        """How long a cycle may run before no call starts."""
        if self._cycle_s is None:
            return self.stall_s
        return min(self.stall_s, max(OVERDUE_FLOOR_S, OVERDUE_FACTOR * self._cycle_s))

    @property
    def window_cap(self) -> int:
        """Created threads waiting for a commit above which no call starts."""
        return max(WINDOW_FLOOR, int(WINDOW_FACTOR * max(self._per_cycle, self._last_cycle)))

    @property
    def stalled(self) -> bool:
        """A commit cycle is overdue (the broker is away, or the process starved)."""
        started = self._cycle_started
        return started is not None and self._clock() - started > self.overdue_s

    @property
    def is_open(self) -> bool:
        return (
            self.healthy
            and self.held < self.cap
            and self.created < self.window_cap
            and not self.stalled
        )

    async def enter(self) -> None:
        """Wait until a call may start, then hold a unit for it."""
        while not self.is_open:
            changed = self._changed
            # an overdue cycle ends only when it ends (which notifies); the timeout only
            # rechecks a gate that was closed by the clock alone
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.overdue_s):  # wait_for: a task per wait
                    await changed.wait()
        self.held += 1

    def leave(self) -> None:
        """The call ended without a thread to commit: give its unit back."""
        self.held = max(0, self.held - 1)
        self._notify()

    def thread_created(self) -> None:
        """The call created a thread: its result waits for a commit cycle."""
        self.created += 1

    def cycle_started(self) -> None:
        self._cycle_started = self._clock()

    def cycle_succeeded(self, results: int) -> None:
        """A commit cycle made ``results`` results durable: their units come back."""
        started, self._cycle_started = self._cycle_started, None
        if started is not None:
            took = self._clock() - started
            last = self._cycle_s
            self._cycle_s = took if last is None else last + SMOOTHING * (took - last)
            self._per_cycle += SMOOTHING * (results - self._per_cycle)
            self._last_cycle = results
        self.healthy = True
        self.held = max(0, self.held - results)
        self.created = max(0, self.created - results)
        self._notify()

    def cycle_failed(self) -> None:
        self._cycle_started = None
        self.healthy = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
