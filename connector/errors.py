"""The connector's exceptions, classified by what the caller does next.

::

    ConnectorError
    ├── ConfigError            bad configuration: stop at start-up, naming the field
    ├── EventRejected          this event cannot be processed: dead-letter it (stage, reason)
    ├── ApiError               a Threads API call failed
    │   ├── RetriableApiError  408/425/429/5xx, 3xx, timeout, connection error: retry
    │   ├── PermanentApiError  other 4xx: the event's fault (dead-letter it) or, for a run
    │   │                      of events, the configuration's (pause the route: systemic)
    │   └── AuthError          401/403: the connector is misconfigured: pause and alert
    │       └── ApiKeyInvalid  the key read cannot be sent as a header: pause, name the source
    └── FencedError            another instance took over our transactional id: rejoin

Foreign exceptions (``aiohttp.*``, ``aiokafka.errors.*``) are translated into these only in
the adapters that call those libraries (``threads_client``, ``source``, ``sink``).
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Where in the pipeline an event was rejected (the dead-letter ``stage`` header)."""

    PARSE = "parse"
    VALIDATE = "validate"
    ROUTE = "route"
    API = "api"


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


class ConfigError(ConnectorError):
    """The configuration is invalid; the message names each offending field."""


class TopicError(ConfigError):
    """A topic the settings name is missing, and the connector may not (or cannot) create
    it. ``category``: its readiness category (``metrics.NOT_READY_REASONS``)."""

    category = "topic_missing"


class TopicConfigError(TopicError):
    """An output topic's configuration would make the broker refuse our records."""

    category = "topic_config"


class ChangelogError(TopicError):
    """A dedup changelog is missing, lost, or breaks its contract."""

    category = "changelog"


REASON_MAX = 1000  # characters of a rejection's reason (it may quote the event's values)


class EventRejected(ConnectorError):
    """An event that must go to the dead-letter topic.

    ``reason`` is for people (it may name fields); ``code`` is a short, bounded label
    (``invalid_json``, ``no_route``, ``http_422`` …) safe to use as a metric label.
    ``reason`` is cut at ``REASON_MAX`` characters, saying its size: it quotes event
    values (an event type, a rendered agentUid) and is the dead-letter log line.
    """

    def __init__(self, stage: Stage, reason: str, *, code: str, status: int | None = None) -> None:
        if len(reason) > REASON_MAX:
            reason = f"{reason[:REASON_MAX]}… ({len(reason)} characters)"
        super().__init__(f"{stage.value}: {reason}")
        self.stage = stage
        self.reason = reason
        self.code = code
        self.status = status


class ApiError(ConnectorError):
    """A Threads API call did not return 201. ``path`` is the URL path called (no host,
    never the key), for the dead letter's reason and readiness."""

    def __init__(self, message: str, *, status: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.path = path


class RetriableApiError(ApiError):
    """Worth retrying after a backoff.

    ``outcome_unknown`` is true when the request may have reached the API (a read timeout
    after the body was sent): the thread may exist even though we never saw its id.
    ``kind`` names a failure without a status (``connect_error``, ``tls_error``,
    ``timeout``, ``protocol_error``, ``body_too_large``, ``proxy_error``: the egress proxy
    is unreachable or refused us), or ``redirect``: a bounded label.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        outcome_unknown: bool = False,
        kind: str | None = None,
        path: str = "",
    ) -> None:
        super().__init__(message, status=status, path=path)
        self.retry_after_s = retry_after_s
        self.outcome_unknown = outcome_unknown
        self.kind = kind

    @property
    def transport_failure(self) -> bool:
        """The API could not be reached or is failing as a whole (the circuit breaker's
        kind): a connection or TLS failure, no complete answer within the deadline (a
        black hole, headers then a stall) or a connection dropped without an answer, a
        5xx without ``Retry-After`` (with one, the API is alive and says when to come
        back: that is the rate limit's pause), or a redirect (not followed: the base URL
        is not where the API answers). An oversized body is an answer: it does not count.
        One slow call among answers does not trip the breaker either: it counts failures
        in a row, and any answer resets the count."""
        if self.status is not None:
            if 300 <= self.status < 400:
                return True
            return self.status >= 500 and self.retry_after_s is None
        return self.kind in TRANSPORT_KINDS


TRANSPORT_KINDS = frozenset(
    {"connect_error", "tls_error", "timeout", "protocol_error", "proxy_error"}
)


class PermanentApiError(ApiError):
    """The API rejected this request; retrying cannot help."""


class AuthError(ApiError):
    """401/403: the API key is missing, wrong, or not valid for the appUid."""


class ApiKeyInvalid(AuthError):
    """The API key as read cannot be a header value (empty, control characters, an
    embedded newline, non-ASCII). The message names where it was read, never the value."""


class FencedError(ConnectorError):
    """Our transactional producer was fenced; the instance must stop its work and rejoin."""
