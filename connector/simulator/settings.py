"""The simulator's settings: frozen pydantic models, loadable from YAML.

``SimulatorSettings`` is built once at start-up (YAML file, then CLI flags on top).
``BehaviorSpec`` is the part that can be replaced while the server runs
(``PUT /_simulator/faults`` or ``ThreadsApiSimulator.set_behavior``): latency, faults and
the rate limit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

DEFAULT_APP_UID = "demo-app"
DEFAULT_API_KEY = "demo-key"  # a documented demo credential
DEFAULT_AGENTS = ("agent-orders", "agent-onboarding", "agent-compliance", "agent-support")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AppSpec(_Frozen):
    """One application the simulator knows."""

    api_key: SecretStr = Field(description="the x-api-key that this appUid accepts")
    agents: list[str] = Field(
        default_factory=list,
        description="agentUids that exist in this app; empty = any agentUid exists",
    )


class LatencySpec(_Frozen):
    """How long the agent takes before the API answers (sampled per request).

    - ``fixed``: always ``median_ms``.
    - ``uniform``: between ``min_ms`` and ``max_ms``.
    - ``exponential``: with median ``median_ms``.
    - ``lognormal``: with median ``median_ms`` and 99th percentile ``p99_ms``
      (default 4 x the median).

    Every sample is then clamped to ``[min_ms, max_ms]``.
    """

    distribution: Literal["fixed", "uniform", "exponential", "lognormal"] = "fixed"
    median_ms: float = Field(default=0.0, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    min_ms: float = Field(default=0.0, ge=0)
    max_ms: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> LatencySpec:
        if self.max_ms is not None and self.max_ms < self.min_ms:
            raise ValueError("max_ms must be >= min_ms")
        if self.distribution == "uniform" and self.max_ms is None:
            raise ValueError("the uniform distribution needs max_ms")
        if self.distribution == "lognormal":
            if self.median_ms <= 0:
                raise ValueError("the lognormal distribution needs median_ms > 0")
            if self.p99_ms is not None and self.p99_ms < self.median_ms:
                raise ValueError("p99_ms must be >= median_ms")
        return self


class FaultSpec(_Frozen):
    """Injected failures, each a probability per request (their sum is at most 1).

    A timeout hangs the request ``hang_s`` seconds without an answer, then answers 504
    (as a gateway would). With ``timeout_creates_thread`` the thread is created before the
    hang: the client never hears of it, which is the API's "unknown outcome" case.
    """

    error_rate_502: float = Field(default=0.0, ge=0, le=1)
    error_rate_503: float = Field(default=0.0, ge=0, le=1)
    error_rate_504: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=300.0, gt=0)
    timeout_creates_thread: bool = True
    retry_after_s: int | None = Field(
        default=None, ge=0, description="Retry-After header sent with injected 503 responses"
    )

    @model_validator(mode="after")
    def _sum_at_most_one(self) -> FaultSpec:
        total = self.error_rate_502 + self.error_rate_503 + self.error_rate_504
        if total + self.timeout_rate > 1.0 + 1e-9:
            raise ValueError("error rates and timeout_rate must add up to at most 1")
        return self


HostileMode = Literal[
    "none",
    "retry_after",
    "retry_after_date",
    "trickle_body",
    "huge_body",
    "slow_headers",
    "reset",
    "black_hole",
]


class HostileSpec(_Frozen):
    """An API that misbehaves in one way, for the first ``count`` createThread requests
    that pass the API key, body and agent checks (every one when ``count`` is None), then
    behaves again. Modes:

    - ``retry_after``: 429 with ``Retry-After: <retry_after_s>`` (delta-seconds).
    - ``retry_after_date``: 429 with ``Retry-After`` an HTTP date ``retry_after_s`` ahead.
    - ``trickle_body``: the thread is created, a 201 whose body comes one byte every
      ``trickle_interval_s``.
    - ``huge_body``: the thread is created, a 201 whose JSON body is ``body_bytes`` long
      (``threadUid`` first, then padding), streamed.
    - ``slow_headers``: nothing is sent for ``headers_delay_s``, then the normal answer.
    - ``reset``: the connection is closed without an answer (no thread is created).
    - ``black_hole``: the request is accepted and never answered, before any check (a hung
      gateway): the connection stays open until the client gives up or the server stops;
      no thread is created. ``count`` counts these requests, not only those that pass.
    """

    mode: HostileMode = "none"
    count: int | None = Field(default=None, ge=0, description="None = every request")
    retry_after_s: int = Field(default=999_999, ge=0)
    trickle_interval_s: float = Field(default=2.0, gt=0)
    body_bytes: int = Field(default=50 * 1024 * 1024, ge=64)
    headers_delay_s: float = Field(default=30.0, ge=0)


class BehaviorSpec(_Frozen):
    """What may change while the simulator runs. Omitted fields take their defaults."""

    latency: LatencySpec = Field(default_factory=LatencySpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)
    rate_limit_per_s: float | None = Field(
        default=None, gt=0, description="token bucket refill rate; None = no limit"
    )
    rate_limit_burst: int | None = Field(
        default=None, ge=1, description="bucket size; None = one second's worth of tokens"
    )
    hostile: HostileSpec = Field(default_factory=HostileSpec)

    @property
    def burst(self) -> int:
        """The effective bucket size."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit_per_s or 1.0))


def _default_apps() -> dict[str, AppSpec]:
    return {
        DEFAULT_APP_UID: AppSpec(api_key=SecretStr(DEFAULT_API_KEY), agents=list(DEFAULT_AGENTS))
    }


class SimulatorSettings(_Frozen):
    """Everything the simulator needs at start-up."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 = pick a free port")
    apps: dict[str, AppSpec] = Field(default_factory=_default_apps, min_length=1)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    rate_limit_burst: int | None = Field(default=None, ge=1)
    hostile: HostileSpec = Field(default_factory=HostileSpec)
    tls_cert_file: Path | None = Field(default=None, description="serve https with this PEM")
    tls_key_file: Path | None = Field(default=None, description="its private key (PEM)")
    seed: int | None = Field(default=None, description="seed for reproducible randomness")
    access_log: bool = False
    shutdown_timeout_s: float = Field(
        default=5.0, ge=0, description="how long stop() lets in-flight requests finish"
    )

    @model_validator(mode="after")
    def _app_uids_not_empty(self) -> SimulatorSettings:
        if any(not uid for uid in self.apps):
            raise ValueError("appUid must not be empty (OpenAPI: minLength 1)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    def behavior(self) -> BehaviorSpec:
        """The runtime-replaceable part of these settings."""
        return BehaviorSpec(
            latency=self.latency,
            faults=self.faults,
            rate_limit_per_s=self.rate_limit_per_s,
            rate_limit_burst=self.rate_limit_burst,
            hostile=self.hostile,
        )

    @classmethod
    def from_yaml(cls, path: Path | str, **overrides: Any) -> SimulatorSettings:
        """Load a YAML file; ``overrides`` (top-level keys) win over the file."""
        return cls.model_validate({**load_yaml(path), **overrides})


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is an empty mapping)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return data
