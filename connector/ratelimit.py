"""Rate limiting: a token bucket, the group share, adaptive backoff and ``Retry-After``.

The group-wide limit needs no shared store: each replica takes the share of the global
rate that its share of the input partitions gives it, recomputed on every rebalance, so
the replicas together never exceed the global rate. On 429/503 the local rate backs off
multiplicatively and recovers additively (AIMD); ``Retry-After`` pauses new calls.

A token bucket alone lets any window of W seconds see ``rate x W + burst`` calls, and a
replica that catches up after a late timer adds one more: with three replicas that is
several calls over the group's limit in some windows. So each bucket also keeps the times
of its recent calls (a sliding log) and never makes more than ``floor(rate x W)`` calls in
any window of W seconds: the replicas' floors add up to at most the global ``L x W``.

The clock is injectable so these primitives are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def group_share(global_rate: float, owned: int, total: int) -> float:
    """This replica's part of the group's rate: proportional to the partitions it owns."""
    if total <= 0 or owned <= 0:
        return 0.0
    return global_rate * min(owned, total) / total


class AdaptiveRate:
    """AIMD factor in [min_fraction, 1] applied to the configured rate."""

    def __init__(
        self,
        *,
        decrease_factor: float,
        increase_per_s: float,
        min_fraction: float,
        clock: Clock = time.monotonic,
        cooldown_s: float = 1.0,
    ) -> None:
        self._decrease = decrease_factor
        self._increase = increase_per_s
        self._min = min_fraction
        self._clock = clock
        self._cooldown = cooldown_s
        self._factor = 1.0
        self._last_update = clock()
        self._last_decrease = float("-inf")

    @property
    def factor(self) -> float:
        self._recover()
        return self._factor

    def on_overload(self) -> None:
        """A 429 or 503: cut the rate, at most once per cool-down (one burst, one cut)."""
        self._recover()
        now = self._clock()
        if now - self._last_decrease >= self._cooldown:
            self._factor = max(self._min, self._factor * self._decrease)
            self._last_decrease = now

    def _recover(self) -> None:
        now = self._clock()
        elapsed = now - self._last_update
        self._last_update = now
        if elapsed > 0 and now - self._last_decrease >= self._cooldown:
            self._factor = min(1.0, self._factor + self._increase * elapsed)


class TokenBucket:
    """Tokens at ``rate`` per second up to ``burst``; starts empty so a (re)start never bursts.
    No more than ``floor(rate x window_s)`` calls (at least one) in any ``window_s``.

    ``acquire`` is FIFO: waiters queue on a lock and take tokens in arrival order.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        adaptive: AdaptiveRate | None = None,
        window_s: float = 1.0,
    ) -> None:
        self._rate = rate
        self._window_s = window_s
        self._sent: deque[float] = deque()  # times of the calls within the last window
        self._burst = max(1.0, burst)
        self._clock = clock
        self._sleep = sleep
        self._adaptive = adaptive
        self._tokens = 0.0
        self._stamp = clock()
        self._paused_until = 0.0
        self._ramp_from = float("-inf")
        self._ramp_s = 0.0
        self._lock = asyncio.Lock()
        self._queued = 0  # callers inside ``acquire``: ``take_now`` never jumps the queue
        self.waited_s = 0.0  # total time callers spent waiting (for metrics)

    @property
    def rate(self) -> float:
        """The rate in force now (the share times the adaptive factor)."""
        factor = self._adaptive.factor if self._adaptive else 1.0
        if self._ramp_s > 0:
            ramp = (self._clock() - self._ramp_from) / self._ramp_s
            factor *= min(1.0, max(0.1, ramp))
        return self._rate * factor

    def set_rate(self, rate: float, burst: float | None = None, ramp_s: float = 0.0) -> None:
        """Change the rate; with ``ramp_s`` it climbs linearly to it from 10% (slow start,
        so a replica that just got partitions does not send a burst while it is busiest)."""
        self._refill()
        if ramp_s > 0:
            self._ramp_from = self._clock()
        self._ramp_s = ramp_s
        self._rate = rate
        if burst is not None:
            self._burst = max(1.0, burst)
        self._tokens = min(self._tokens, self._burst) if rate > 0 else 0.0

    def pause_for(self, seconds: float) -> None:
        """``Retry-After``: no token is handed out before ``seconds`` from now."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def pause_remaining_s(self) -> float:
        """Seconds left of the ``Retry-After`` pause (0 when none)."""
        return max(0.0, self._paused_until - self._clock())

    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self, waiting: bool = False) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        # While a caller waits, what accrues during its oversleep (timer and event-loop
        # latency) is its own: without that one token of slack, a burst of 1 would lose
        # the oversleep every time and the real rate would fall short of the limit.
        cap = self._burst + 1.0 if waiting else self._burst
        self._tokens = min(cap, self._tokens + elapsed * self.rate)

    def try_acquire(self, waiting: bool = False) -> float:
        """Take a token and return 0, or return how long to wait before trying again.
        ``waiting``: the caller has been waiting for this token (see ``_refill``)."""
        self._refill(waiting)
        now = self._clock()
        pause = self._paused_until - now
        if pause > 0:
            return pause
        rate = self.rate
        if rate <= 0:
            return 1.0  # no partitions owned: nothing should be calling; check again soon
        if self._tokens < 1.0:
            return (1.0 - self._tokens) / rate
        full = self._window_full_for(now, rate)
        if full > 0:
            return full
        self._tokens -= 1.0
        self._sent.append(now)
        return 0.0

    def _window_full_for(self, now: float, rate: float) -> float:
        """How long until one more call fits in the sliding window (0: it fits now)."""
        sent = self._sent
        while sent and sent[0] <= now - self._window_s:
            sent.popleft()
        cap = max(1, math.floor(rate * self._window_s + 1e-9))
        if len(sent) < cap:
            return 0.0
        # the call `cap` back must leave the window first
        return sent[-cap] + self._window_s - now

    def take_now(self) -> bool:
        """Take a token if one is free now and nobody waits for one (the per-event fast
        path: no lock, no coroutine); else False, and ``acquire`` is the way."""
        return not self._queued and self.try_acquire() == 0

    async def acquire(self) -> float:
        """Wait for a token; return the seconds waited."""
        self._queued += 1
        try:
            async with self._lock:
                waited = 0.0
                while (wait := self.try_acquire(waiting=waited > 0)) > 0:
                    await self._sleep(wait)
                    waited += wait
                self.waited_s += waited
                return waited
        finally:
            self._queued -= 1
