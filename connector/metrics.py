"""Prometheus metrics, defined once.

Named by Prometheus conventions: a ``threads_connector_`` prefix, base units in the name
(``_seconds``), ``_total`` on counters. Labels are bounded: topics, partitions, stages,
short reason codes, HTTP codes and the configured apps (``app``: the routes' and
``api.apps``' appUids); never event ids or user ids.

Each ``Metrics`` owns its registry, so several connectors can run in one process (tests)
without colliding; the app serves its own registry on ``/metrics``.

Labelled counters whose label values are known up front are created at 0 (Prometheus'
"avoid missing metrics"): a series born at 1 is invisible to ``increase()``/``rate()``, so
without this the first dead letter of a kind, the first 401 or the first failed commit
would never reach a dashboard or fire an alert. The dashboard and the alerts are in the Helm
chart (``dashboards/``, ``rules/``); docs/metrics-and-alerts.md describes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, Self, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from connector import __version__

PREFIX = "threads_connector"
# An API call starts an LLM agent turn: 0.1 s to a minute and more.
CALL_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120)
E2E_BUCKETS_S = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
COMMIT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)

# Label values created at 0 (see the module docstring). ``DEAD_LETTER_REASONS`` lists the
# ``EventRejected.code`` values per stage; a code missing here still counts, it only skips
# its first increment in ``increase()`` (tests/test_observability.py keeps the list in step
# with the code).
DEAD_LETTER_REASONS: dict[str, tuple[str, ...]] = {
    "parse": (
        "empty_value",
        "invalid_json",
        "not_an_object",
        "undecodable_record",
        "schema_error",
        "invalid_cloudevent",
    ),
    "validate": (
        "no_event_id",
        "invalid_event_id",
        "ambiguous_event_id",
        "no_event_type",
        "invalid_request",
        "invalid_identifier",
        "missing_field",
        "template_error",
        "invalid_event_time",
    ),
    "route": ("no_route", "expired"),
    "api": ("retries_exhausted", "http_400", "http_404", "http_422", "request_error"),
}
# Why /readyz is red, as a bounded label (``not_ready{reason}``); the line itself is in
# /readyz. kafka: unreachable or refused; topic_missing: an input (or, with create_topics
# false, an output) topic; topic_config: an output's max.message.bytes too small;
# changelog: a dedup changelog missing, lost or breaking its contract; joining: not in the
# group yet; kafka_acl: a start-up permission check failed; registry: the schema registry;
# api_path / api_key: the start-up probe (or the calls) found a wrong base_url or key;
# api_unreachable: the circuit breaker is open; api_throttled: a long Retry-After;
# api_stopped: api.on_error stop; route_paused: a run of one API error;
# partition_blocked: a partition stopped or held by an open transaction; commit_stalled.
NOT_READY_REASONS = (
    "kafka",
    "topic_missing",
    "topic_config",
    "changelog",
    "joining",
    "kafka_acl",
    "registry",
    "api_path",
    "api_key",
    "api_unreachable",
    "api_throttled",
    "api_stopped",
    "route_paused",
    "partition_blocked",
    "commit_stalled",
)
API_RESPONSE_CODES: tuple[tuple[str, str], ...] = (
    ("2xx", "201"),
    ("4xx", "401"),
    ("4xx", "403"),
    ("4xx", "429"),
    ("5xx", "502"),
    ("5xx", "503"),
    ("5xx", "504"),
    ("error", "timeout"),
    ("error", "connect_error"),
)
RETRY_CODES = ("429", "502", "503", "504", "timeout", "connect_error")
STATUS_CLASSES = ("2xx", "4xx", "5xx", "error")
COMMIT_MODES = ("transaction", "at_least_once")  # ``Sink.mode``
REBALANCE_KINDS = ("assign", "revoke")
DEDUP_KINDS = ("window", "in_flight", "dead_letter")


class _CachedLabels:
    """``labels(...)`` memoised by the values as passed (positional only).

    prometheus_client checks, converts to ``str`` and takes a lock on each ``labels()``
    call (about 1.3 µs); the per-event path makes four such calls an event. A hit here is
    one dict look-up. ``remove``/``clear`` drop the memo with the series."""

    _memo: dict[tuple[object, ...], Any]

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        memo = self.__dict__.get("_memo")
        if memo is not None and not labelkwargs:
            child = memo.get(labelvalues)
            if child is not None:
                return child  # type: ignore[no-any-return]
        child = super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        if not labelkwargs:
            self.__dict__.setdefault("_memo", {})[labelvalues] = child
        return child  # type: ignore[no-any-return]

    def remove(self, *labelvalues: object) -> None:
        self.__dict__.pop("_memo", None)
        super().remove(*labelvalues)  # type: ignore[misc]

    def clear(self) -> None:
        self.__dict__.pop("_memo", None)
        super().clear()  # type: ignore[misc]


class CachedCounter(_CachedLabels, Counter):
    """A Counter whose labelled children are memoised (used on the per-event path)."""


class CachedHistogram(_CachedLabels, Histogram):
    """A Histogram whose labelled children are memoised (used on the per-event path)."""


class Metrics:
    """Every metric the connector exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # prometheus_client registers these with its global registry only: a registry
            # of our own lacked process_* (CPU, memory, open files) and python_* series
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        r = self.registry
        p = PREFIX
        self.events_consumed = CachedCounter(
            f"{p}_events_consumed_total",
            "Records fetched from input topics.",
            ["topic"],
            registry=r,
        )
        self.dedup_hits = CachedCounter(
            f"{p}_dedup_hits_total",
            "Events dropped as duplicates: seen in the window, in flight already, or "
            "dead-lettered already (kind dead_letter: same source offset, replayed).",
            ["topic", "kind"],
            registry=r,
        )
        self.threads_created = CachedCounter(
            f"{p}_threads_created_total",
            "Threads created (201 from the API).",
            ["topic", "app"],
            registry=r,
        )
        self.results_published = Counter(
            f"{p}_results_published_total", "Result records published.", registry=r
        )
        self.api_responses = CachedCounter(
            f"{p}_api_responses_total",
            "Threads API responses by status class (2xx, 4xx, 5xx, error) and code "
            "(HTTP status, or timeout / connect_error), per app.",
            ["status_class", "code", "app"],
            registry=r,
        )
        self.api_call_duration = CachedHistogram(
            f"{p}_api_call_duration_seconds",
            "Duration of one Threads API call attempt, by app.",
            ["status_class", "app"],
            buckets=CALL_BUCKETS_S,
            registry=r,
        )
        self.event_attempts = Histogram(
            f"{p}_event_attempts",
            "API attempts an event needed, success or not.",
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.api_retries = Counter(
            f"{p}_api_retries_total",
            "API attempts retried, by the code that caused it.",
            ["code"],
            registry=r,
        )
        self.api_outcome_unknown = Counter(
            f"{p}_api_outcome_unknown_total",
            "Attempts whose outcome is unknown (timeout after sending): possible duplicates.",
            registry=r,
        )
        self.dead_letters = CachedCounter(
            f"{p}_dead_letters_total",
            "Records sent to the dead-letter topic, by input topic and app (empty before "
            "a route chose one).",
            ["stage", "reason", "app", "topic"],
            registry=r,
        )
        self.calls_in_flight = Gauge(
            f"{p}_calls_in_flight",
            "Threads API requests on the wire now (handed to the HTTP client, not returned), "
            "per app.",
            ["app"],
            registry=r,
        )
        self.calls_waiting = Gauge(
            f"{p}_calls_waiting",
            "Calls waiting to start: for a concurrency slot, a rate-limit token, or the "
            "duplicate-exposure gate.",
            registry=r,
        )
        self.uncommitted_threads = Gauge(
            f"{p}_uncommitted_threads",
            "Calls started whose results are not committed yet (on the wire, retrying, or "
            "created and waiting for a commit): what a crash now could duplicate. At most "
            "delivery.max_uncommitted_threads.",
            registry=r,
        )
        self.threads_awaiting_commit = Gauge(
            f"{p}_threads_awaiting_commit",
            "Threads created whose results are not committed yet (the uncommitted window: "
            "the part of uncommitted_threads that is no longer on the wire).",
            registry=r,
        )
        self.calls_gate_closed = Gauge(
            f"{p}_calls_gate_closed",
            "1 while no call may start: the uncommitted cap or window is reached, or a commit "
            "cycle failed or is overdue.",
            registry=r,
        )
        self.events_in_progress = Gauge(
            f"{p}_events_in_progress", "Events fetched and not yet finished.", registry=r
        )
        self.rate_limit_rate = Gauge(
            f"{p}_rate_limit_per_second",
            "This replica's current call rate limit (group share times adaptive factor).",
            ["app"],
            registry=r,
        )
        self.rate_limit_share = Gauge(
            f"{p}_rate_limit_share_per_second",
            "This replica's share of the group rate, before adaptive backoff.",
            ["app"],
            registry=r,
        )
        self.rate_limit_tokens = Gauge(
            f"{p}_rate_limit_tokens", "Tokens in the bucket now.", ["app"], registry=r
        )
        self.rate_limit_wait = Counter(
            f"{p}_rate_limit_wait_seconds_total",
            "Time calls spent waiting for a token.",
            registry=r,
        )
        self.rate_limited = Counter(
            f"{p}_rate_limited_total",
            "429 and 503 answers that slowed the rate down.",
            ["app"],
            registry=r,
        )
        self.auth_paused = Gauge(
            f"{p}_auth_paused",
            "1 while the app's calls are paused by a 401/403 from the API.",
            ["app"],
            registry=r,
        )
        self.api_breaker_open = Gauge(
            f"{p}_api_breaker_open",
            "1 while calls are paused by the circuit breaker (lasting connection, TLS or 5xx "
            "failures toward the API).",
            registry=r,
        )
        self.api_paused_seconds = Gauge(
            f"{p}_api_paused_seconds",
            "Seconds left of the pause the API asked for with Retry-After "
            "(capped by api.max_retry_after_s).",
            ["app"],
            registry=r,
        )
        self.route_paused_status = Gauge(
            f"{p}_route_paused_status",
            "The HTTP status that paused a route's calls (its events were answered with it "
            "in a row: a configuration fault, api.on_error: pause); 0 while it is open.",
            ["app", "route"],
            registry=r,
        )
        self.calls_held = Gauge(
            f"{p}_calls_held",
            "Events answered with a 4xx waiting for a verdict: the app's first success "
            "(then the failure is the event's) or a pause of their route.",
            ["app"],
            registry=r,
        )
        self.api_stopped = Gauge(
            f"{p}_api_stopped",
            "1 once api.on_error: stop has stopped every call at an API error (until a restart).",
            registry=r,
        )
        self.api_key_invalid = Gauge(
            f"{p}_api_key_invalid",
            "1 while the API key as read cannot be sent (empty, control characters, "
            "non-ASCII): the app's calls are paused until the secret is fixed.",
            ["app"],
            registry=r,
        )
        self.partitions_assigned = Gauge(
            f"{p}_partitions_assigned", "Input partitions owned by this replica.", registry=r
        )
        self.partitions_paused = Gauge(
            f"{p}_partitions_paused", "Input partitions paused for backpressure.", registry=r
        )
        self.offsets_skipped = Counter(
            f"{p}_offsets_skipped_total",
            "Offsets never processed because the position was out of range (records "
            "deleted past it by retention or delete-records) and reading went on from the "
            "log start (kafka.offset_out_of_range: reset_earliest).",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_stopped = Gauge(
            f"{p}_partition_stopped",
            "1 while the partition is paused for an operator: its position was out of "
            "range and kafka.offset_out_of_range is stop.",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_blocked = Gauge(
            f"{p}_partition_blocked_seconds",
            "Seconds the partition has had records beyond its position that cannot be "
            "read (position at the last stable offset, the high watermark past it: an "
            "upstream transaction left open); 0 when it can progress.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag",
            "Records between the committed offset and the log end.",
            ["topic", "partition"],
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            f"{p}_end_to_end_latency_seconds",
            "From the event's Kafka timestamp to its result being published.",
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.commit_duration = Histogram(
            f"{p}_commit_duration_seconds",
            "One commit cycle: publish, flush and commit offsets (in a transaction or not).",
            ["mode"],
            buckets=COMMIT_BUCKETS_S,
            registry=r,
        )
        self.commit_failures = Counter(
            f"{p}_commit_failures_total",
            "Commit cycles that failed (aborted transactions).",
            ["mode"],
            registry=r,
        )
        self.outcomes_bounded = Counter(
            f"{p}_outcome_records_bounded_total",
            "Outcome records over kafka.max_request_size or refused by the broker: written "
            "in bounded form (cut, minimal) or left out (changelog records only).",
            ["kind", "form"],
            registry=r,
        )
        for kind in ("result", "dead_letter", "changelog"):
            for form in ("bounded", "left_out"):
                if form == "bounded" or kind == "changelog":
                    self.outcomes_bounded.labels(kind, form)
        self.fenced = Counter(
            f"{p}_producer_fenced_total", "Times the transactional producer was fenced.", registry=r
        )
        self.dedup_entries = Gauge(
            f"{p}_dedup_entries", "Event ids held in the dedup window.", registry=r
        )
        self.dedup_evictions = Counter(
            f"{p}_dedup_evictions_total",
            "Dedup entries dropped for the size bound before their window expired.",
            registry=r,
        )
        self.dedup_restored = Counter(
            f"{p}_dedup_restored_total", "Dedup entries restored from the changelog.", registry=r
        )
        self.rebalances = Counter(
            f"{p}_rebalances_total", "Partition assignments and revocations.", ["kind"], registry=r
        )
        self.schema_registry_up = Gauge(
            f"{p}_schema_registry_up",
            "0 while the schema registry cannot be used (records of its formats wait); "
            "1 after its last fetch worked or when no fetch was needed yet.",
            registry=r,
        )
        self.schema_registry_up.set(1)
        self.schema_registry_failures = Counter(
            f"{p}_schema_registry_failures_total",
            "Schema fetches that failed for the registry's reasons (retried).",
            registry=r,
        )
        self.up = Gauge(
            f"{p}_ready",
            "1 when assigned, connected and not paused by an auth failure.",
            registry=r,
        )
        self.not_ready = Gauge(
            f"{p}_not_ready",
            "1 for the category of why /readyz is red (0 for the others; all 0 when ready).",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            f"{p}_build_info",
            "Always 1; the connector's version as a label (dashboard variables use it).",
            ["version"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)
        self.apps: tuple[str, ...] = ()
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        """Create the known label combinations at 0 (see the module docstring); the
        per-app ones wait for the apps (``init_apps``)."""
        for code in RETRY_CODES:
            self.api_retries.labels(code)
        for mode in COMMIT_MODES:
            self.commit_failures.labels(mode)
            self.commit_duration.labels(mode)
        for kind in REBALANCE_KINDS:
            self.rebalances.labels(kind)

    def init_not_ready(self, category: Callable[[], str | None]) -> None:
        """Each ``not_ready{reason}`` series reads ``category()`` (the connector's current
        one, None when ready) when scraped."""
        for reason in NOT_READY_REASONS:
            self.not_ready.labels(reason).set_function(_is(category, reason))

    def init_apps(self, apps: Iterable[str]) -> None:
        """Create the per-app series at 0 (the apps of the configuration, known at start)."""
        self.apps = tuple(sorted(set(self.apps) | set(apps)))
        for app in self.apps:
            for status_class, code in API_RESPONSE_CODES:
                self.api_responses.labels(status_class, code, app)
            for gauge in APP_GAUGES:
                getattr(self, gauge).labels(app)
            self.rate_limited.labels(app)
            for status_class in STATUS_CLASSES:
                self.api_call_duration.labels(status_class, app)

    def init_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Create each (app, route)'s ``route_paused_status`` at 0."""
        for app, route in routes:
            self.route_paused_status.labels(app, route)

    def init_topics(self, topics: Iterable[str]) -> None:
        """Create the per-input-topic series at 0 (call once the input topics are known)."""
        for topic in topics:
            self.events_consumed.labels(topic)
            for app in self.apps:
                self.threads_created.labels(topic, app)
            for kind in DEDUP_KINDS:
                self.dedup_hits.labels(topic, kind)
            for stage, reasons in DEAD_LETTER_REASONS.items():
                # an API dead letter has its app; the others come before (or without) a route
                for app in self.apps if stage == "api" else ("",):
                    for reason in reasons:
                        self.dead_letters.labels(stage, reason, app, topic)


# The gauges with an ``app`` label (created at 0 per app by ``init_apps``).
APP_GAUGES = (
    "calls_in_flight",
    "rate_limit_rate",
    "rate_limit_share",
    "rate_limit_tokens",
    "auth_paused",
    "api_key_invalid",
    "api_paused_seconds",
    "calls_held",
)


_M = TypeVar("_M", Counter, Histogram)


class _LastLabel(Generic[_M]):  # the package supports Python 3.11: no [M] syntax
    """A labelled metric with its last label (``app``) bound: ``labels(a, b)`` is the
    parent's ``labels(a, b, app)``."""

    def __init__(self, parent: _M, value: str) -> None:
        self._parent: _M = parent
        self._value = value

    def labels(self, *values: str) -> _M:
        child: _M = self._parent.labels(*values, self._value)
        return child


class AppMetrics:
    """The metrics one app's ``ThreadCaller`` writes, its ``app`` label bound, under the
    names of ``Metrics``: the caller's code stays the same for one app or several. Metrics
    without an ``app`` label (durations, retries, the circuit breaker: the API host's)
    are the shared ones, reached through ``base``."""

    def __init__(self, metrics: Metrics, app: str) -> None:
        self.base = metrics
        self.app = app
        self.api_responses = _LastLabel(metrics.api_responses, app)
        self.calls_in_flight: Gauge = metrics.calls_in_flight.labels(app)
        self.rate_limit_rate: Gauge = metrics.rate_limit_rate.labels(app)
        self.rate_limit_share: Gauge = metrics.rate_limit_share.labels(app)
        self.rate_limit_tokens: Gauge = metrics.rate_limit_tokens.labels(app)
        self.rate_limited: Counter = metrics.rate_limited.labels(app)
        self.auth_paused: Gauge = metrics.auth_paused.labels(app)
        self.api_key_invalid: Gauge = metrics.api_key_invalid.labels(app)
        self.api_paused_seconds: Gauge = metrics.api_paused_seconds.labels(app)
        self.calls_held: Gauge = metrics.calls_held.labels(app)
        # the shared ones a call touches, bound here: ``__getattr__`` is the slow path
        self.api_call_duration = _LastLabel(metrics.api_call_duration, app)
        self.api_outcome_unknown = metrics.api_outcome_unknown
        self.rate_limit_wait = metrics.rate_limit_wait
        self.calls_waiting = metrics.calls_waiting
        self.event_attempts = metrics.event_attempts
        self.api_retries = metrics.api_retries

    def route_paused_status(self, route: str) -> Gauge:
        """The app's ``route_paused_status`` gauge of one route."""
        gauge: Gauge = self.base.route_paused_status.labels(self.app, route)
        return gauge

    def __getattr__(self, name: str) -> Any:
        """Any other metric: the shared one (``api_call_duration``, ``api_retries``, ...)."""
        if name == "base":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def _is(category: Callable[[], str | None], reason: str) -> Callable[[], float]:
    """1 while ``category()`` is ``reason``, else 0 (a gauge's function)."""
    return lambda: 1.0 if category() == reason else 0.0
