"""The fault model and the latency sampler: pure, driven by an injected ``random.Random``."""

from __future__ import annotations

import math
import random
from enum import Enum

from connector.simulator.settings import FaultSpec, LatencySpec

# z-score of the 99th percentile of the standard normal distribution
_Z99 = 2.3263478740408408
_DEFAULT_P99_FACTOR = 4.0


class Fault(Enum):
    """What the fault model decided for one request."""

    NONE = "none"
    BAD_GATEWAY = 502
    UNAVAILABLE = 503
    GATEWAY_TIMEOUT = 504
    TIMEOUT = "timeout"  # hang without answering

    @property
    def status(self) -> int | None:
        """The HTTP status to answer with, for the three injected error responses."""
        return self.value if isinstance(self.value, int) else None


class FaultModel:
    """Draws one ``Fault`` per request from the probabilities of a ``FaultSpec``.

    Every call draws exactly one random number, so a seeded run is reproducible whatever
    the rates are.
    """

    def __init__(self, spec: FaultSpec, rng: random.Random) -> None:
        self.spec = spec
        self._rng = rng
        self._table = (
            (Fault.BAD_GATEWAY, spec.error_rate_502),
            (Fault.UNAVAILABLE, spec.error_rate_503),
            (Fault.GATEWAY_TIMEOUT, spec.error_rate_504),
            (Fault.TIMEOUT, spec.timeout_rate),
        )

    def decide(self) -> Fault:
        draw = self._rng.random()
        cumulative = 0.0
        for fault, probability in self._table:
            cumulative += probability
            if probability > 0 and draw < cumulative:
                return fault
        return Fault.NONE


class LatencySampler:
    """Samples a response latency, in seconds, from a ``LatencySpec``."""

    def __init__(self, spec: LatencySpec, rng: random.Random) -> None:
        self.spec = spec
        self._rng = rng
        self._sigma = 0.0
        if spec.distribution == "lognormal":
            p99 = spec.p99_ms if spec.p99_ms is not None else spec.median_ms * _DEFAULT_P99_FACTOR
            self._sigma = (math.log(p99) - math.log(spec.median_ms)) / _Z99

    def sample_ms(self) -> float:
        spec = self.spec
        if spec.distribution == "uniform":
            upper = spec.max_ms if spec.max_ms is not None else spec.min_ms
            value = self._rng.uniform(spec.min_ms, upper)
        elif spec.distribution == "exponential":
            median = spec.median_ms
            value = self._rng.expovariate(math.log(2) / median) if median > 0 else 0.0
        elif spec.distribution == "lognormal":
            value = self._rng.lognormvariate(math.log(spec.median_ms), self._sigma)
        else:
            value = spec.median_ms
        value = max(value, spec.min_ms)
        if spec.max_ms is not None:
            value = min(value, spec.max_ms)
        return value

    def sample_s(self) -> float:
        return self.sample_ms() / 1000.0
