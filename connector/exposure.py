"""The duplicate-exposure gate: how many threads may exist whose results are not committed.

A thread created by the API is only safe once its result is committed: a crash before that
replays its event, and the replay creates a second thread. Calls in flight are not the only
exposure, then: every created thread waiting for a commit counts too, and while the broker
is down nothing commits, so a connector that keeps calling piles up exposure without bound.

``Exposure`` holds one unit per call started (taken in the concurrency slot before the
first token; then on the wire, retrying, or done with a thread whose result waits for a
commit), at most ``cap`` in all. A unit is given back when the
call ends without a thread (the API refused it, the event was abandoned) or when the
commit cycle that carries its result succeeds. While commit cycles fail or stall
(a cycle running longer than ``stall_s``), no call starts: calls already under way finish,
and calls resume once a commit cycle succeeds again. A session that ended on a failed
commit hands the next one a closed gate (``healthy=False``): its first cycle must prove the
broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


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
        self._clock = clock
        self._cycle_started: float | None = None
        self._changed = asyncio.Event()

    @property
    def stalled(self) -> bool:
        """A commit cycle has been running longer than ``stall_s`` (the broker is away)."""
        started = self._cycle_started
        return started is not None and self._clock() - started > self.stall_s

    @property
    def is_open(self) -> bool:
        return self.healthy and self.held < self.cap and not self.stalled

    async def enter(self) -> None:
        """Wait until a call may start, then hold a unit for it."""
        while not self.is_open:
            changed = self._changed
            # a stall ends only when its cycle ends (which notifies); the timeout only
            # rechecks a gate that was closed by the clock alone
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stall_s):  # wait_for: a task per wait
                    await changed.wait()
        self.held += 1

    def leave(self) -> None:
        """The call ended without a thread to commit: give its unit back."""
        self.held = max(0, self.held - 1)
        self._notify()

    def cycle_started(self) -> None:
        self._cycle_started = self._clock()

    def cycle_succeeded(self, results: int) -> None:
        """A commit cycle made ``results`` results durable: their units come back."""
        self._cycle_started = None
        self.healthy = True
        self.held = max(0, self.held - results)
        self._notify()

    def cycle_failed(self) -> None:
        self._cycle_started = None
        self.healthy = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
