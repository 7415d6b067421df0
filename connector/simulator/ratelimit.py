"""The simulator's 429 rate limit: a token bucket with an injectable clock.

Deliberately not ``connector.ratelimit.TokenBucket``: that one is the client's (starts
empty, adaptive, waits); this one models the server (starts full, never waits, answers
``Retry-After``). The simulator must not share code with the client it tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        self._updated = now

    def try_acquire(self) -> float:
        """Take a token: 0.0 if one was free, else the seconds until one will be."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    @staticmethod
    def retry_after_s(wait_s: float) -> int:
        """``Retry-After`` in whole seconds: rounded up, at least 1."""
        return max(1, math.ceil(wait_s))
