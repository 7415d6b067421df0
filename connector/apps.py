"""Several Mindset apps in one deployment: one call policy per app.

The Threads API refuses a key that does not belong to the call's ``appUid`` (403), so
each app a route names gets its own ``AppPolicy``: its key (``api.apps.<appUid>``, else
the default ``api.api_key``), its own token bucket and adaptive rate (its
``rate_limit_per_s``, split across the group by partition share like the single limit
before), its own in-flight cap and HTTP connection pool, and its own auth gate: a 403
or an unusable key pauses that app's calls only, and readiness names the app.

The circuit breaker stays one for the process: it trips on transport failures
(connection, TLS, 5xx storms), which are the API host's, shared by every app; per app,
a host outage would be found N times and probed N times for one cause.

``Apps`` is what the pipeline calls (``call`` picks the route's app) and what the
composition root drives (``start``, ``apply_share``, ``stop_calls``, ``update_gauges``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from connector.calls import Admit, Attempt, CallGuard, Probe, Release, ThreadCaller
from connector.config import ApiSettings, CachedSecret, ConnectorSettings
from connector.events import ThreadCreated
from connector.gates import AuthGate, CircuitBreaker
from connector.metrics import AppMetrics, Metrics
from connector.proxy import Proxy, resolve
from connector.ratelimit import AdaptiveRate, Clock, TokenBucket, group_share
from connector.routing import ThreadRequest, route_label
from connector.systemic import StopGate
from connector.threads_client import ThreadsClient

log = logging.getLogger(__name__)

# Makes an app's attempt function (the real one: a ThreadsClient with the app's key).
AttemptFactory = Callable[["AppPolicy", AsyncExitStack], Attempt]


@dataclass
class AppPolicy:
    """One app's settings, key, rate and (once started) caller."""

    app_uid: str
    api: ApiSettings  # the defaults with the app's own rate limit and in-flight cap
    key: Callable[[], CachedSecret]  # built at start: a key file is read then
    adaptive: AdaptiveRate
    bucket: TokenBucket
    metrics: AppMetrics
    caller: ThreadCaller | None = None
    proxy: Proxy | None = None  # the egress proxy of every app (connector.proxy)

    def apply_share(self, owned: int, total: int, *, ramp: bool = True) -> float:
        """Take this replica's share of the app's group rate; return it."""
        api = self.api
        share = group_share(api.rate_limit_per_s, owned, total)
        burst = max(1.0, api.rate_limit_burst * (share / api.rate_limit_per_s))
        self.bucket.set_rate(share, burst, ramp_s=api.ramp_up_s if ramp else 0.0)
        self.metrics.rate_limit_share.set(share)
        self.metrics.rate_limit_rate.set(self.bucket.rate)
        return share


def client_attempt(policy: AppPolicy, stack: AsyncExitStack) -> Attempt:
    """The real attempt: an HTTP client of the app's own (its key, a pool its cap's size)."""
    api = policy.api
    client = ThreadsClient(
        api.base_url,
        policy.key(),
        connect_timeout_s=api.connect_timeout_s,
        request_timeout_s=api.request_timeout_s,
        max_in_flight=api.max_in_flight,
        max_response_bytes=api.max_response_bytes,
        ca_file=api.ca_file,
        proxy=policy.proxy,
    )
    stack.push_async_callback(client.close)
    return client.create_thread


def _probe_of(attempt: Attempt, app_uid: str) -> Probe | None:
    """The app's probe (a request that cannot create a thread) by the client whose
    attempt this is; None for a test double."""
    client = getattr(attempt, "__self__", None)
    if not isinstance(client, ThreadsClient):
        return None

    async def probe() -> int:
        status, _url = await client.probe(app_uid)
        return status

    return probe


class Apps:
    """The configured apps' policies, and the call of a request by its ``appUid``."""

    def __init__(
        self, settings: ConnectorSettings, metrics: Metrics, *, clock: Clock = time.monotonic
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self.breaker = CircuitBreaker(
            settings.api.breaker_failure_threshold, settings.api.breaker_probe_interval_s
        )
        # api.on_error: stop stops every app's calls at the first API error
        self.stop_gate = StopGate() if settings.api.on_error == "stop" else None
        metrics.init_apps(settings.app_uids())
        self.proxy = resolve(settings.api)
        if self.proxy is not None:
            log.info("Threads API calls go through the proxy %s", self.proxy.describe())
        metrics.init_routes((route.app_uid, route_label(route)) for route in settings.routes)
        self.policies = {app: self._policy(app) for app in settings.app_uids()}
        self._stack: AsyncExitStack | None = None
        self._owned = 0  # this replica's input partitions, of ``_total``: the rate shares
        self._total = 0
        self._attempt_for: AttemptFactory = client_attempt

    def _policy(self, app_uid: str) -> AppPolicy:
        api = self._settings.api.for_app(app_uid)
        adaptive = AdaptiveRate(
            decrease_factor=api.adaptive_decrease_factor,
            increase_per_s=api.adaptive_increase_per_s,
            min_fraction=api.adaptive_min_fraction,
            clock=self._clock,
        )
        bucket = TokenBucket(
            0.0,
            api.rate_limit_burst,
            adaptive=adaptive,
            window_s=api.rate_limit_window_s,
            clock=self._clock,
        )
        settings = self._settings
        return AppPolicy(
            app_uid,
            api,
            lambda: settings.app_key(app_uid),
            adaptive,
            bucket,
            AppMetrics(self._metrics, app_uid),
            proxy=self.proxy,
        )

    def start(self, stack: AsyncExitStack, attempt_for: AttemptFactory | None = None) -> None:
        """Make each app's caller (and HTTP client, closed with ``stack``). A key file
        that cannot be read stops start-up here, naming the file, as before."""
        self._stack = stack
        if attempt_for is not None:
            self._attempt_for = attempt_for
        for policy in self.policies.values():
            self._make_caller(policy)

    def _make_caller(self, policy: AppPolicy) -> ThreadCaller:
        if self._stack is None:
            raise RuntimeError("Apps.start() makes the callers before calls are made")
        attempt = self._attempt_for(policy, self._stack)
        policy.caller = ThreadCaller(
            attempt,
            policy.api,
            policy.bucket,
            policy.adaptive,
            policy.metrics,
            auth_gate=AuthGate(policy.api.auth_probe_interval_s),
            breaker=self.breaker,
            stop_gate=self.stop_gate,
            probe=_probe_of(attempt, policy.app_uid),
        )
        return policy.caller

    def caller(self, app_uid: str) -> ThreadCaller:
        """The app's caller. Routes name their apps literally, so every app is known at
        start; one that is not (a configuration changed under a test) gets the defaults."""
        policy = self.policies.get(app_uid)
        if policy is None:
            policy = self.policies[app_uid] = self._policy(app_uid)
            self._metrics.init_apps([app_uid])
            self._apply(policy)
        return policy.caller or self._make_caller(policy)

    async def call(
        self,
        request: ThreadRequest,
        event_id: str,
        correlation_id: str,
        guard: CallGuard | None = None,
        admit: Admit | None = None,
        release: Release | None = None,
    ) -> ThreadCreated:
        """``ThreadCaller.call`` under the policy of the request's app."""
        caller = self.caller(request.app_uid)
        return await caller.call(
            request, event_id, correlation_id, guard=guard, admit=admit, release=release
        )

    def pause_reason(self) -> str | None:
        """Which apps' calls are paused, and why (None: none is): for /readyz."""
        paused = self.pause()
        return paused[1] if paused is not None else None

    def pause(self) -> tuple[str, str] | None:
        """``(category, reason)``: the first paused app's category, every paused app's
        reason (None: none is paused)."""
        paused = [
            (pause[0], f"app {app}: {pause[1]}")
            for app, policy in self.policies.items()
            if policy.caller is not None and (pause := policy.caller.pause()) is not None
        ]
        if not paused:
            return None
        return paused[0][0], "; ".join(reason for _category, reason in paused)

    # -- the group's rate, per app ----------------------------------------------------------

    def apply_share(self, owned: int, total: int) -> dict[str, float]:
        """Each app takes this replica's share of its own group rate (``owned`` of the
        ``total`` input partitions), ramping up; returns the shares by app."""
        self._owned, self._total = owned, total
        return {app: policy.apply_share(owned, total) for app, policy in self.policies.items()}

    def _apply(self, policy: AppPolicy) -> None:
        policy.apply_share(self._owned, self._total, ramp=False)

    def stop_calls(self) -> None:
        """No new calls until the next assignment sets the shares (a revocation)."""
        self._owned = 0
        for policy in self.policies.values():
            policy.bucket.set_rate(0.0)

    def update_gauges(self) -> None:
        for policy in self.policies.values():
            policy.metrics.rate_limit_tokens.set(policy.bucket.tokens())
            policy.metrics.rate_limit_rate.set(policy.bucket.rate)

    def rates(self) -> dict[str, float]:
        """The rate in force now, by app (for the logs)."""
        return {app: round(policy.bucket.rate, 3) for app, policy in self.policies.items()}
