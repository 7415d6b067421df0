"""Settings: one YAML file validated by pydantic, every field overridable from the environment.

Precedence, highest first: environment (``THREADS_CONNECTOR_<SECTION>__<FIELD>``), then
the YAML file, then the defaults below. Secrets (the API key, the SASL password) come only
from the environment or from mounted files (``*_file`` fields); a secret written into the
YAML file stops start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import string
import time
import typing
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from connector.config_sources import env_source, file_line, key_lines, suggest_key, unknown_env
from connector.errors import ApiKeyInvalid, ConfigError

ENV_PREFIX = "THREADS_CONNECTOR_"
IDENTIFIER_FIELDS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")
_SECRET_FIELDS = {
    ("api", "api_key"),
    ("kafka", "sasl_password"),
    ("kafka", "ssl_key_password"),
    ("schema_registry", "password"),
    ("schema_registry", "bearer_token"),
    ("kafka", "oauth_client_secret"),
}
# a template placeholder: ``${dotted.path}`` (or ``$name``); ``$$`` is a literal dollar
TEMPLATE_ID = r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*"
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")


def _refuse_credentials(url: str, where: str) -> None:
    """A URL with ``user:password@`` is refused, masked (the credentials would reach logs
    and check-config's output); ``where`` says where they go instead."""
    if _USERINFO.match(url):
        raise ValueError(f"must not hold credentials ({mask_url(url)}): {where}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeliveryMode(StrEnum):
    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


class Ordering(StrEnum):
    UNORDERED = "unordered"
    KEY = "key"


class KafkaSettings(_Frozen):
    """Where the events come from and where results go."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "threads-connector"
    group_id: str = "threads-connector"
    input_topics: list[str] = Field(default_factory=lambda: ["domain-events"], min_length=1)
    results_topic: str = "thread-results"
    dead_letter_topic: str = "thread-dead-letters"
    create_topics: bool = Field(
        default=True,
        description="create the results, dead-letter and dedup changelog topics if missing",
    )
    create_input_topics: bool = Field(
        default=False,
        description="create missing input topics too (a typo'd topic would be created and "
        "consumed empty for ever: off unless asked)",
    )
    topic_partitions: int = Field(default=6, ge=1, description="for topics the connector creates")
    replication_factor: int = Field(default=1, ge=1)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    offset_out_of_range: Literal["reset_earliest", "stop"] = Field(
        default="reset_earliest",
        description="a position out of range (records deleted past it): go on from the log "
        "start, counting and logging the offsets skipped, or stop the partition (paused, "
        "readiness red naming it) for an operator to decide",
    )
    blocked_partition_after_s: float = Field(
        default=120.0,
        gt=0,
        description="a partition whose position has been at the last stable offset this long "
        "with records beyond it (an upstream transaction left open) turns readiness red, "
        "naming it; above the upstream producers' transaction.timeout.ms (60 s by default)",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    oauth_token_url: str | None = Field(
        default=None, description="OAUTHBEARER: the identity provider's token endpoint"
    )
    oauth_client_id: str | None = Field(default=None, min_length=1)
    oauth_client_secret: SecretStr | None = None
    oauth_client_secret_file: Path | None = None
    oauth_scope: str | None = Field(default=None, description="space-separated scopes")
    oauth_refresh_margin_s: float = Field(
        default=60.0, gt=0, description="a token is replaced this long before it expires"
    )
    oauth_timeout_s: float = Field(default=10.0, gt=0, description="one token request")
    oauth_ca_file: Path | None = Field(default=None, description="PEM CA of the token endpoint")
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = Field(default=None, description="client certificate (mTLS)")
    ssl_keyfile: Path | None = Field(default=None, description="its private key (PEM)")
    ssl_key_password: SecretStr | None = None
    ssl_key_password_file: Path | None = None
    ssl_check_hostname: bool = True
    retry_initial_s: float = Field(default=1.0, gt=0, description="after a Kafka failure")
    retry_max_s: float = Field(default=30.0, gt=0, description="the backoff's cap")
    probe_interval_s: float = Field(default=10.0, gt=0, description="reachability probe")
    startup_checks: bool = Field(
        default=True,
        description="run checks the group's, the input topics' and the transactional ids' "
        "permissions once the topics are ready; a missing ACL turns readiness red, naming it",
    )
    permission_recheck_s: float = Field(
        default=60.0, gt=0, description="a failed start-up check is run again this often"
    )
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description="static group membership: a name stable across restarts of this "
        "replica (a StatefulSet pod name); a restart within session_timeout_ms moves no "
        "partition. Unique in the group",
    )
    transaction_timeout_ms: int = Field(
        default=60_000,
        ge=1_000,
        le=900_000,
        description="exactly_once: how long the broker lets one of our transactions stay "
        "open before it aborts it. A replica frozen in the middle of a commit cycle holds "
        "its partitions' next owner this long (plus the broker's cleanup interval, 10 s): "
        "that owner's committed-offset fetch waits for the transaction to end. A commit "
        "cycle lasts well under a second; at most the broker's transaction.max.timeout.ms",
    )
    static_members: int | None = Field(
        default=None,
        ge=0,
        description="with a group_instance_id ending in -<n> (a StatefulSet ordinal): only "
        "replicas with n below this are static members; the others join as dynamic members "
        "and leave the group when they stop, so a scale-in hands their partitions over at "
        "once (the chart sets it to the autoscaler's minimum). None: every replica with a "
        "group_instance_id is static",
    )
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    fetch_max_records: int = Field(default=500, ge=1)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    producer_retry_backoff_ms: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="the output producer's wait before it retries a request the broker "
        "answered with a retriable error. A transaction that follows another races the "
        "broker's commit markers and is answered CONCURRENT_TRANSACTIONS (NOT_ENOUGH_REPLICAS "
        "or COORDINATOR_NOT_AVAILABLE to aiokafka's request versions): with aiokafka's 100 ms "
        "about 1 commit cycle in 70 waited 100 ms or more (bench/latency.py)",
    )
    metadata_max_age_ms: int = Field(
        default=300_000,
        ge=1_000,
        description="how often the consumer re-reads topic metadata: partitions added to an "
        "input topic are picked up (and their changelog grown) within this",
    )
    max_request_size: int = Field(
        default=1_048_576,
        ge=65_536,
        description="bytes; the largest record the producer sends, checked against the "
        "output topics' max.message.bytes at start-up",
    )
    oversize_value: Literal["truncate", "omit"] = Field(
        default="truncate",
        description="an outcome record over max_request_size: its value cut, or left out",
    )

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and not self.sasl_mechanism:
            raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
        return self

    @model_validator(mode="after")
    def _static_ordinal(self) -> KafkaSettings:
        if (
            self.static_members is not None
            and self.group_instance_id is not None
            and _ordinal(self.group_instance_id) is None
        ):
            raise ValueError(
                f"static_members needs a group_instance_id ending in -<ordinal> (a "
                f"StatefulSet pod name), not {self.group_instance_id!r}"
            )
        return self

    def static_instance_id(self) -> str | None:
        """The group instance id this replica joins with: ``group_instance_id``, unless
        ``static_members`` makes it a dynamic member (None)."""
        gid, limit = self.group_instance_id, self.static_members
        if gid is None or limit is None:
            return gid
        ordinal = _ordinal(gid)
        return gid if ordinal is not None and ordinal < limit else None

    @model_validator(mode="after")
    def _oauth_complete(self) -> KafkaSettings:
        oauth = self.sasl_mechanism == "OAUTHBEARER"
        if oauth and (self.oauth_token_url is None or self.oauth_client_id is None):
            raise ValueError(
                "sasl_mechanism OAUTHBEARER needs oauth_token_url and oauth_client_id "
                "(and the secret: oauth_client_secret_file or THREADS_CONNECTOR_KAFKA__"
                "OAUTH_CLIENT_SECRET)"
            )
        if not oauth and (self.oauth_token_url is not None or self.oauth_client_id is not None):
            raise ValueError("oauth_token_url / oauth_client_id are only used with OAUTHBEARER")
        if oauth and self.sasl_username is not None:
            raise ValueError("sasl_username is not used with OAUTHBEARER (oauth_client_id is)")
        return self

    @field_validator("oauth_token_url")
    @classmethod
    def _token_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _refuse_credentials(value, "the client secret goes in kafka.oauth_client_secret_file")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _client_certificate(self) -> KafkaSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mTLS)")
        if self.ssl_certfile is not None and not self.security_protocol.endswith("SSL"):
            raise ValueError(
                "ssl_certfile needs security_protocol SSL or SASL_SSL "
                f"(it is {self.security_protocol})"
            )
        if (
            self.ssl_key_password is not None or self.ssl_key_password_file is not None
        ) and self.ssl_keyfile is None:
            raise ValueError("ssl_key_password is only used with ssl_keyfile")
        return self


def _ordinal(name: str) -> int | None:
    """The ordinal a StatefulSet pod name ends in (``connector-2`` → 2), else None."""
    head, _, tail = name.rpartition("-")
    return int(tail) if head and tail.isdigit() else None


class DeliverySettings(_Frozen):
    """Delivery semantics, commit cadence, ordering and lifecycle deadlines."""

    mode: DeliveryMode = DeliveryMode.EXACTLY_ONCE
    ordering: Ordering = Ordering.UNORDERED
    commit_interval_ms: int = Field(default=250, ge=10)
    transactional_id_prefix: str = "threads-connector"
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)
    max_buffered_events: int = Field(default=2_000, ge=1, description="pause fetching above")
    max_uncommitted_threads: int = Field(
        default=1_000, ge=1, description="calls started whose results are not committed, at most"
    )
    commit_stall_s: float = Field(
        default=5.0, gt=0, description="a commit cycle this long stops new calls until one ends"
    )
    drain_timeout_s: float = Field(default=70.0, gt=0)
    revoke_timeout_s: float = Field(default=65.0, gt=0)


class DedupSettings(_Frozen):
    """Deduplication by event id, scoped to the consumer group."""

    store: Literal["changelog", "memory"] = "changelog"
    event_id_field: str = "id"
    event_id_header: str = "event-id"
    max_event_id_length: int = Field(default=256, ge=1, description="characters; longer: DLQ")
    ttl_s: float = Field(default=86_400.0, gt=0)
    max_entries: int = Field(default=1_000_000, ge=1)
    changelog_suffix: str = "dedup-changelog"
    restore_timeout_s: float = Field(default=120.0, gt=0)
    changelog_check_interval_s: float = Field(
        default=60.0, gt=0, description="how often a running replica re-checks its changelogs"
    )


class AppSettings(_Frozen):
    """One Mindset app's own key, rate limit and in-flight cap (``api.apps.<appUid>``).

    The API refuses a key that does not belong to the ``appUid`` of the call (403), so
    routes naming several apps need a key each. An unset field takes the ``api`` value of
    the same name (the defaults); each app gets its own token bucket, in-flight cap and
    auth pause, whatever it inherits.
    """

    api_key: SecretStr | None = Field(
        default=None, description="from THREADS_CONNECTOR_API__APPS__<appUid>__API_KEY only"
    )
    api_key_file: Path | None = Field(default=None, description="a mounted secret file")
    rate_limit_per_s: float | None = Field(default=None, gt=0, description="for the group")
    rate_limit_burst: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1, le=10_000)

    @property
    def has_key(self) -> bool:
        return self.api_key is not None or self.api_key_file is not None


# What a 4xx answer does (``connector.systemic``): ``pause`` dead-letters an event's own
# failure and pauses a route that fails the same way for a run of events; ``dead_letter``
# dead-letters every one (Kafka Connect's errors.tolerance=all); ``stop`` stops every call
# at the first (errors.tolerance=none), the event kept, until a restart.
ApiOnError = Literal["pause", "dead_letter", "stop"]


class ApiSettings(_Frozen):
    """The Threads API, its credentials, and how hard we may call it."""

    base_url: str = "https://a.api.mindset.ai"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=60.0, gt=0)
    max_in_flight: int = Field(default=256, ge=1, le=10_000)
    rate_limit_per_s: float = Field(default=20.0, gt=0, description="for the whole group")
    rate_limit_burst: int = Field(default=20, ge=1)
    rate_limit_window_s: float = Field(
        default=1.0, gt=0, le=60, description="no window this long sees over limit x window"
    )
    ramp_up_s: float = Field(default=1.0, ge=0, description="slow start after assignment")
    auth_probe_interval_s: float = Field(default=30.0, gt=0, description="after 401/403")
    secret_refresh_s: float = Field(default=10.0, gt=0, description="re-read api_key_file")
    max_attempts: int = Field(default=6, ge=1)
    retry_budget_s: float = Field(default=600.0, gt=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    adaptive_decrease_factor: float = Field(default=0.5, gt=0, lt=1)
    adaptive_increase_per_s: float = Field(default=0.05, gt=0, description="fraction/s")
    adaptive_min_fraction: float = Field(default=0.05, gt=0, le=1)
    max_response_bytes: int = Field(
        default=1_048_576, ge=1_024, description="a longer body fails the attempt"
    )
    ca_file: Path | None = Field(default=None, description="PEM CA bundle for the API's TLS")
    proxy_url: str | None = Field(
        default=None,
        description="http://host:port of a forward proxy for the API calls (else HTTPS_PROXY "
        "/ HTTP_PROXY / NO_PROXY); credentials go in proxy_auth_file",
    )
    proxy_auth_file: Path | None = Field(
        default=None, description="a mounted file holding the proxy's user:password"
    )
    proxy_from_env: bool = Field(
        default=True, description="honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY"
    )
    max_retry_after_s: float = Field(default=300.0, gt=0, description="cap on Retry-After")
    max_pause_ready_s: float = Field(
        default=60.0, gt=0, description="a longer Retry-After pause turns /readyz red"
    )
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="transport failures in a row that pause calls"
    )
    breaker_probe_interval_s: float = Field(default=5.0, gt=0, description="while paused")
    on_error: ApiOnError = Field(
        default="pause",
        description="a 4xx answer: pause (a run pauses the route), dead_letter, or stop",
    )
    pause_after_failures: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="distinct events failing with the same status in a row pause their route",
    )
    pause_probe_interval_s: float = Field(
        default=30.0, gt=0, description="a paused route's probe, with one of its events"
    )
    startup_probe: bool = Field(
        default=True,
        description="at start, each app's path and key are probed by a request that cannot "
        "create a thread; 401/403/404/405 pause the app's calls, readiness naming it",
    )
    startup_probe_interval_s: float = Field(
        default=30.0, gt=0, description="a refused start-up probe is sent again this often"
    )
    apps: dict[str, AppSettings] = Field(
        default_factory=dict,
        description="per-app key, rate limit and in-flight cap, by appUid (unset: the above)",
    )

    @field_validator("apps")
    @classmethod
    def _app_names(cls, apps: dict[str, AppSettings]) -> dict[str, AppSettings]:
        """Environment variable names are case-insensitive (pydantic-settings lower-cases
        them): ``..._APPS__APP-A__API_KEY`` lands on ``app-a``. Two names differing only in
        case are an app the environment meant but could not name: refuse them."""
        seen: dict[str, str] = {}
        for name in apps:
            if not name.strip():
                raise ValueError("an app name (appUid) must not be empty")
            check_app_uid(name)
            other = seen.setdefault(name.lower(), name)
            if other != name:
                raise ValueError(
                    f"{other!r} and {name!r} differ only in case: environment variable "
                    f"names are case-insensitive (they give the lower-case name); for an "
                    f"appUid with capitals use api.apps.<appUid>.api_key_file"
                )
        return apps

    def for_app(self, app_uid: str) -> ApiSettings:
        """These settings with the app's own rate limit, burst and in-flight cap."""
        own = self.apps.get(app_uid)
        if own is None:
            return self
        update = {
            name: value
            for name in ("rate_limit_per_s", "rate_limit_burst", "max_in_flight")
            if (value := getattr(own, name)) is not None
        }
        return self.model_copy(update=update) if update else self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        _refuse_credentials(
            value, f"the API key goes in {ENV_PREFIX}API__API_KEY or api.api_key_file"
        )
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        if "?" in value or "#" in value:
            # the API's path is appended to it: a query or fragment would swallow it
            raise ValueError("must not have a query (?) or a fragment (#)")
        return value.rstrip("/")

    @field_validator("proxy_url")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _refuse_credentials(value, "put user:password in api.proxy_auth_file")
        if not re.match(r"^http://[^/\s?#]+/?$", value):
            raise ValueError(
                "must be http://host:port (the proxy is spoken to in plain HTTP; an https:// "
                "API goes through it with CONNECT, its TLS end to end)"
            )
        return value.rstrip("/")


IdentifierField = Literal["humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress"]


class UserIdentifier(_Frozen):
    """Which API identifier to send, and where in the event it is.

    With ``field`` set, ``path`` points at the identifier's value (``user.id``). Without
    it, ``path`` points at an object in the event holding exactly one of the API's
    identifier keys (``{"externalUserId": "u-1"}``), and the event chooses.
    """

    field: IdentifierField | None = None
    path: str = Field(min_length=1, description="dotted path in the event, e.g. user.id")


class Route(_Frozen):
    """Events of one type on one topic become threads of one agent."""

    topic: str = Field(default="*", description="input topic, or * for any")
    event_type: str = Field(min_length=1, description="value of the event type field, or *")
    app_uid: str = Field(min_length=1)
    agent_uid: str = Field(min_length=1, description="agentUid or agentUid::sessionUid; template")
    message_type: Literal["user", "system"] = "system"
    message_template: str = Field(min_length=1)
    user: UserIdentifier
    max_event_age_s: float | None = Field(
        default=None, gt=0, description="older events are dead-lettered (expired), no call"
    )
    event_time_field: str | None = Field(
        default=None,
        min_length=1,
        description="dotted path of the event time (ISO-8601 or epoch); else the record time",
    )

    @field_validator("agent_uid", "message_template")
    @classmethod
    def _template_syntax(cls, value: str) -> str:
        return check_template_syntax(value)

    @field_validator("app_uid")
    @classmethod
    def _app_uid(cls, value: str) -> str:
        return check_app_uid(value)


InputFormat = Literal["json", "avro", "protobuf", "json_schema"]
REGISTRY_FORMATS = ("avro", "protobuf", "json_schema")
RESULT_HEADERS = ("event-id", "correlation-id")  # the connector's own result headers


class TopicFormat(_Frozen):
    """How one input topic's record values are encoded (docs/formats.md)."""

    format: InputFormat = Field(
        default="json",
        description="json, or the Confluent wire format (schema id + payload, schema from "
        "schema_registry) with avro, protobuf or json_schema",
    )
    cloudevents: bool = Field(
        default=False,
        description="records may be CloudEvents (Kafka binding, binary or structured mode)",
    )


class InputSettings(_Frozen):
    """How input records are read: per-topic formats, the correlation id's header."""

    topics: dict[str, TopicFormat] = Field(
        default_factory=dict,
        description="format by input topic (kafka.input_topics); a topic not named is JSON",
    )
    correlation_id_header: str | None = Field(
        default=None,
        min_length=1,
        description="event header whose value is the correlation id (else a new one)",
    )


class SchemaRegistrySettings(_Frozen):
    """A Confluent-compatible schema registry (Confluent, Apicurio's ccompat API, Redpanda,
    Karapace): where the avro, protobuf and json_schema topics' schemas come from."""

    url: str | None = Field(
        default=None, description="base URL, e.g. http://registry:8081 or .../apis/ccompat/v7"
    )
    username: str | None = Field(default=None, description="basic auth")
    password: SecretStr | None = Field(
        default=None, description="from THREADS_CONNECTOR_SCHEMA_REGISTRY__PASSWORD only"
    )
    password_file: Path | None = None
    bearer_token: SecretStr | None = Field(
        default=None, description="from THREADS_CONNECTOR_SCHEMA_REGISTRY__BEARER_TOKEN only"
    )
    bearer_token_file: Path | None = None
    ca_file: Path | None = Field(default=None, description="PEM CA bundle for the registry's TLS")
    request_timeout_s: float = Field(default=10.0, gt=0)
    retry_initial_s: float = Field(default=1.0, gt=0, description="after a failed fetch")
    retry_max_s: float = Field(default=30.0, gt=0, description="the backoff's cap")
    max_cached_schemas: int = Field(default=1_000, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _refuse_credentials(
            value,
            "use schema_registry.username and "
            f"{ENV_PREFIX}SCHEMA_REGISTRY__PASSWORD or schema_registry.password_file",
        )
        if not re.match(r"^https?://[^/\s]+", value) or "?" in value or "#" in value:
            raise ValueError("must be an http:// or https:// URL without a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> SchemaRegistrySettings:
        basic = self.password is not None or self.password_file is not None
        bearer = self.bearer_token is not None or self.bearer_token_file is not None
        if basic and self.username is None:
            raise ValueError("a password needs schema_registry.username")
        if self.username is not None and not basic:
            raise ValueError(
                f"schema_registry.username needs {ENV_PREFIX}SCHEMA_REGISTRY__PASSWORD "
                f"or schema_registry.password_file"
            )
        if basic and bearer:
            raise ValueError("basic auth and a bearer token: set one of them")
        return self


class ResultSettings(_Frozen):
    deep_link_template: str = "https://app.example.com/agent?thread=${threadUid}"
    forward_headers: list[str] = Field(
        default_factory=list,
        description="event headers copied to the result record (allow-list, by name)",
    )

    @field_validator("forward_headers")
    @classmethod
    def _not_ours(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name:
                raise ValueError("a header name must not be empty")
            if name.lower() in RESULT_HEADERS:
                raise ValueError(f"{name!r} is the connector's own result header")
        return names

    @field_validator("deep_link_template")
    @classmethod
    def _template_syntax(cls, value: str) -> str:
        return check_template_syntax(value)


class ServerSettings(_Frozen):
    """The health/metrics server: its own thread, bounded, so a flood cannot slow the
    pipeline. Loopback by default; in a pod set ``0.0.0.0`` (the chart does) so the kubelet
    and Prometheus reach it, and restrict who may with a NetworkPolicy."""

    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    max_connections: int = Field(default=64, ge=1, le=10_000, description="served at once")
    header_timeout_s: float = Field(default=5.0, gt=0, description="to send request + headers")
    metrics_cache_s: float = Field(default=1.0, ge=0, description="reuse a /metrics body")


class LogSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class TracingSettings(_Frozen):
    """OpenTelemetry tracing (docs/tracing.md). The exporter and the sampler are set by the
    standard ``OTEL_*`` environment variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_TRACES_SAMPLER``...), which the OpenTelemetry SDK reads itself."""

    enabled: bool = Field(default=False, description="a trace per event, exported with OTLP")
    service_name: str = Field(
        default="threads-connector", min_length=1, description="unless OTEL_SERVICE_NAME is set"
    )


class ConnectorSettings(BaseSettings):
    """The whole configuration, frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    event_type_field: str = "type"
    routes: list[Route] = Field(min_length=1)
    results: ResultSettings = Field(default_factory=ResultSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _secrets_present(self) -> ConnectorSettings:
        """Every route's app needs a key: its own (``api.apps``) or the default one."""
        default_key = self.api.api_key is not None or self.api.api_key_file is not None
        keyless = [
            (index, route.app_uid)
            for index, route in enumerate(self.routes)
            if not default_key
            and not (route.app_uid in self.api.apps and self.api.apps[route.app_uid].has_key)
        ]
        if keyless and not self.api.apps:
            raise ValueError(
                f"api.api_key is required: set {ENV_PREFIX}API__API_KEY "
                f"or api.api_key_file (a mounted secret file)"
            )
        if keyless:
            raise ValueError(
                "; ".join(
                    f"routes.{index} (app_uid {app!r}) has no API key: set "
                    f"{app_key_env(app)} or api.apps.{app}.api_key_file, or a default "
                    f"api.api_key ({ENV_PREFIX}API__API_KEY) / api.api_key_file"
                    for index, app in keyless
                )
            )
        k = self.kafka
        if k.sasl_mechanism == "OAUTHBEARER":
            if not (k.oauth_client_secret or k.oauth_client_secret_file):
                raise ValueError(
                    f"kafka.oauth_client_secret ({ENV_PREFIX}KAFKA__OAUTH_CLIENT_SECRET) or "
                    "kafka.oauth_client_secret_file is required with OAUTHBEARER"
                )
        elif k.sasl_mechanism and not (k.sasl_password or k.sasl_password_file):
            raise ValueError("kafka.sasl_password (env) or kafka.sasl_password_file is required")
        return self

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> ConnectorSettings:
        """Deadlines that could never be met are refused here, not discovered in an incident."""
        request_s = self.api.request_timeout_s
        problems = [
            f"delivery.{name} ({value:g}) must exceed api.request_timeout_s ({request_s:g}): "
            f"a call under way could never finish within it"
            for name, value in (
                ("drain_timeout_s", self.delivery.drain_timeout_s),
                ("revoke_timeout_s", self.delivery.revoke_timeout_s),
            )
            if value <= request_s
        ]
        if self.api.backoff_initial_s > self.api.backoff_max_s:
            problems.append("api.backoff_initial_s must not exceed api.backoff_max_s")
        if self.kafka.retry_initial_s > self.kafka.retry_max_s:
            problems.append("kafka.retry_initial_s must not exceed kafka.retry_max_s")
        k = self.kafka
        if k.heartbeat_interval_ms >= k.session_timeout_ms:
            problems.append(
                f"kafka.heartbeat_interval_ms ({k.heartbeat_interval_ms}) must be below "
                f"kafka.session_timeout_ms ({k.session_timeout_ms})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _formats_usable(self) -> ConnectorSettings:
        """Every topic given a format is an input topic; a registry format needs the URL."""
        problems = []
        for topic, fmt in self.input.topics.items():
            if topic not in self.kafka.input_topics:
                problems.append(
                    f"input.topics.{topic}: not one of kafka.input_topics "
                    f"({', '.join(self.kafka.input_topics)})"
                )
            if fmt.format in REGISTRY_FORMATS and self.schema_registry.url is None:
                problems.append(
                    f"input.topics.{topic}.format {fmt.format} needs schema_registry.url"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _routes_distinct(self) -> ConnectorSettings:
        """Two routes for one (topic, event type): the second could never be chosen."""
        seen: dict[tuple[str, str], int] = {}
        for index, route in enumerate(self.routes):
            key = (route.topic, route.event_type)
            if key in seen:
                raise ValueError(
                    f"routes.{index} duplicates routes.{seen[key]} (topic {route.topic!r}, "
                    f"event_type {route.event_type!r}): only the first would ever be used"
                )
            seen[key] = index
        return self

    def api_key(self) -> CachedSecret:
        """The API key provider (environment, or the mounted file re-read periodically)."""
        return CachedSecret(
            self.api.api_key, self.api.api_key_file, "api.api_key_file", self.api.secret_refresh_s
        )

    def app_key(self, app_uid: str) -> CachedSecret:
        """The key for calls to ``app_uid``: its own (``api.apps``), else the default."""
        own = self.api.apps.get(app_uid)
        if own is None or not own.has_key:
            return self.api_key()
        return CachedSecret(
            own.api_key,
            own.api_key_file,
            f"api.apps.{app_uid}.api_key_file",
            self.api.secret_refresh_s,
            env_name=app_key_env(app_uid),
        )

    def app_uids(self) -> list[str]:
        """The apps this configuration can call (the routes' and ``api.apps``'): the
        bounded values of the metrics' ``app`` label."""
        return sorted({route.app_uid for route in self.routes} | set(self.api.apps))

    def ssl_key_password(self) -> SecretStr | None:
        """The client key's password (mTLS), from the environment or a mounted file."""
        k = self.kafka
        if k.ssl_key_password is None and k.ssl_key_password_file is None:
            return None
        return _secret(k.ssl_key_password, k.ssl_key_password_file, "kafka.ssl_key_password_file")

    def oauth_client_secret(self) -> SecretStr:
        """The OAuth client secret (OAUTHBEARER), read again at every call: a rotated
        mounted secret is used from the next token request."""
        k = self.kafka
        return _secret(
            k.oauth_client_secret, k.oauth_client_secret_file, "kafka.oauth_client_secret_file"
        )

    def sasl_password(self) -> SecretStr | None:
        if self.kafka.sasl_password is None and self.kafka.sasl_password_file is None:
            return None
        return _secret(
            self.kafka.sasl_password, self.kafka.sasl_password_file, "kafka.sasl_password_file"
        )


class CachedSecret:
    """A secret from the environment or a mounted file, re-read from the file at most every
    ``refresh_s`` seconds, so a rotated Kubernetes secret is picked up without a restart.

    The value is checked where it is read: surrounding whitespace is stripped, and a value
    that cannot be a header (empty, control characters, an embedded newline, non-ASCII)
    raises ``ApiKeyInvalid`` naming the source (``env_name`` or the file), never the
    value. Calls pause on it like on a 401; a fixed file heals it at the next re-read.
    """

    def __init__(
        self,
        value: SecretStr | None,
        path: Path | None,
        name: str,
        refresh_s: float,
        env_name: str = f"{ENV_PREFIX}API__API_KEY",
    ) -> None:
        self._value = value
        self._path = path
        self._name = name
        self._refresh_s = refresh_s
        self._source = env_name if value is not None else f"{name} ({path})"
        self._cached, self._problem = self._load()
        self._read_at = time.monotonic()

    def _load(self) -> tuple[SecretStr, str | None]:
        """The value and what keeps it from being sent (None: nothing). A file that is
        not UTF-8 is an unusable key like one with a line break (UnicodeDecodeError, a
        ValueError, escaped the call and stopped the replica, its message quoting a byte
        of the key); a file that cannot be read raises ConfigError."""
        if self._value is not None or self._path is None:
            return _checked(_secret(self._value, self._path, self._name))
        try:
            text = _read_secret(self._path, self._name).decode("utf-8")
        except UnicodeDecodeError:
            return SecretStr(""), "it is not UTF-8 text"
        return _checked(SecretStr(text))

    def __call__(self) -> SecretStr:
        if self._value is None and time.monotonic() - self._read_at > self._refresh_s:
            self._read_at = time.monotonic()
            # keep the last value read while the file cannot be read (being replaced)
            with contextlib.suppress(ConfigError):
                self._cached, self._problem = self._load()
        if self._problem is not None:
            raise ApiKeyInvalid(f"the API key from {self._source} cannot be sent: {self._problem}")
        return self._cached


def check_app_uid(app_uid: str) -> str:
    """An appUid is one segment of the request path, percent-encoded; ``.`` and ``..``
    cannot be one: ``.`` is unreserved, so they are sent as they are and every URL library
    removes them (``/api/v1/appuid/../threads`` is sent to ``/api/v1/threads``)."""
    if app_uid in (".", ".."):
        raise ValueError(f"appUid {app_uid!r} is a dot segment: it cannot be a URL path segment")
    return app_uid


def app_key_env(app_uid: str) -> str:
    """The environment variable of an app's key (pydantic-settings' nested naming: it
    matches case-insensitively, and Kubernetes allows the dashes of an appUid in it)."""
    return f"{ENV_PREFIX}API__APPS__{app_uid.upper()}__API_KEY"


def header_value_problem(value: str) -> str | None:
    """What keeps ``value`` from being an HTTP header value, in words that never quote it."""
    if not value:
        return "it is empty"
    if "\n" in value or "\r" in value:
        return "it contains a line break"
    if not value.isascii():
        return "it contains a non-ASCII character"
    if not value.isprintable():
        return "it contains a control character"
    return None


def _checked(secret: SecretStr) -> tuple[SecretStr, str | None]:
    value = secret.get_secret_value().strip()
    return SecretStr(value), header_value_problem(value)


def _secret(value: SecretStr | None, path: Path | None, name: str) -> SecretStr:
    if value is not None:
        return value
    if path is None:
        raise ConfigError(f"{name}: no secret configured")
    try:
        return SecretStr(_read_secret(path, name).decode("utf-8").strip())
    except UnicodeDecodeError:
        # from None: the error's text quotes a byte of the secret
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None


def _read_secret(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from exc


def mask_url(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@``, fit for a message."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", url, count=1)


class _TemplateSyntax(string.Template):
    idpattern = TEMPLATE_ID


def check_template_syntax(template: str) -> str:
    """Raise ValueError naming the first malformed placeholder (an unclosed ``${``, a name
    that is not a dotted path, a lone ``$``); ``$$`` is a literal dollar."""
    for match in _TemplateSyntax.pattern.finditer(template):
        if match.group("invalid") is not None:
            start = match.start()
            excerpt = template[start : start + 30]
            raise ValueError(
                f"malformed placeholder at character {start}: {excerpt!r} "
                f"(write ${{dotted.path}}, or $$ for a literal $)"
            )
    return template


class DuplicateKeyError(ValueError):
    """A mapping in the config file gives one key twice."""


MAX_CONFIG_NODES = 100_000
"""The most values a config file may expand to: its aliases (``*name``) repeat what an
anchor holds, and ten of them nested ten deep are a billion values to walk and validate,
a start-up (or check-config) that never ends."""


class ExpansionError(ValueError):
    """The config file's aliases expand to more than MAX_CONFIG_NODES values."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` becomes once its aliases are expanded, each shared node
    counted once per use but computed once (``sizes``), so the count itself stays fast."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


def _check_nodes(node: yaml.Node | None) -> None:
    """Refuse a file whose aliases expand beyond MAX_CONFIG_NODES, then its duplicate keys."""
    if node is None:
        return
    size = _expanded_size(node, {})
    if size > MAX_CONFIG_NODES:
        raise ExpansionError(
            f"its aliases expand to {size} values (at most {MAX_CONFIG_NODES}): "
            f"an alias bomb, or a mistake"
        )
    _refuse_duplicate_keys(node, "", set())


def _refuse_duplicate_keys(node: yaml.Node | None, where: str, seen_nodes: set[int]) -> None:
    """PyYAML keeps the last of two equal keys silently (a second ``api:`` block would
    replace the first, defaults and all): refuse them, naming the dotted path. A node
    reached again through an alias was checked the first time (``seen_nodes``)."""
    if node is None or id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}{index}.", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(
                f"{where}{key}: given twice (lines {seen[key]} and {line}); "
                f"the second would silently replace the first"
            )
        seen[key] = line
        _refuse_duplicate_keys(value_node, f"{where}{key}.", seen_nodes)


def load_settings(path: Path | None) -> ConnectorSettings:
    """Read, merge with the environment and validate; raise ConfigError naming each field."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            _check_nodes(node)
            lines = key_lines(node)
            loaded = yaml.safe_load(text)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            # a binary file, or one saved in another encoding: say where, not a traceback
            raise ConfigError(
                f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)"
            ) from None
        except RecursionError:
            # PyYAML composes nested collections recursively: thousands of ``[`` deep
            raise ConfigError(f"{path}: its values are nested too deeply") from None
        except (DuplicateKeyError, ExpansionError) as exc:
            raise ConfigError(f"invalid configuration (1 problem(s)):\n  {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    for section, name in sorted(_SECRET_FIELDS):
        if isinstance(data.get(section), dict) and data[section].get(name) is not None:
            env_name = f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
            raise ConfigError(
                f"{section}.{name}: secrets must not be written in the config file; "
                f"set {env_name} or {section}.{name}_file"
            )
    apps = data.get("api", {}).get("apps") if isinstance(data.get("api"), dict) else None
    for app, app_data in (apps or {}).items() if isinstance(apps, dict) else ():
        if isinstance(app_data, dict) and app_data.get("api_key") is not None:
            raise ConfigError(
                f"api.apps.{app}.api_key: secrets must not be written in the config file; "
                f"set {app_key_env(str(app))} or api.apps.{app}.api_key_file"
            )
    unknown = unknown_env(ConnectorSettings, ENV_PREFIX)
    if unknown:
        raise ConfigError(
            f"invalid environment ({len(unknown)} problem(s)):\n  " + "\n  ".join(unknown)
        )
    try:
        return ConnectorSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, lines)) from exc
    except SettingsError as exc:
        raise ConfigError(_environment_problem(exc)) from None


def _environment_problem(exc: SettingsError) -> str:
    """pydantic-settings cannot parse a complex field (a list) from the environment: say
    which variable, and how to write it, without its value (it might be a secret)."""
    match = re.search(r'field "([^"]+)" from source "([^"]+)"', str(exc))
    if match is None or match.group(2) != "EnvSettingsSource":
        return "invalid configuration: " + str(exc).split("\n", 1)[0]
    section = match.group(1)
    names = _unparsable_env(section) or [f"{ENV_PREFIX}{section.upper()}__*"]
    return "invalid configuration:\n" + "\n".join(
        f'  {name}: not valid JSON (lists are written as JSON, e.g. \'["a", "b"]\')'
        for name in names
    )


def _unparsable_env(section: str) -> list[str]:
    """The environment variables of ``section`` that hold a list or mapping field and do
    not parse as JSON (their values are not quoted: one might be a secret)."""
    base = f"{ENV_PREFIX}{section.upper()}"
    found = []
    for name, value in sorted(os.environ.items()):
        upper = name.upper()
        if upper != base and not upper.startswith(base + "__"):
            continue
        try:
            json.loads(value)
        except ValueError:
            if upper == base or _is_structured(section, upper[len(base) + 2 :].lower()):
                found.append(name)
    return found


def _is_structured(section: str, field: str) -> bool:
    model = ConnectorSettings.model_fields[section].annotation
    fields = getattr(model, "model_fields", {})
    annotation = fields[field].annotation if field in fields else None
    return typing.get_origin(annotation) in (list, dict)


def format_validation_error(
    exc: ValidationError, path: Path | None = None, lines: dict[str, int] | None = None
) -> str:
    """One line per offending field, led by where its value came from: the environment
    variable (``THREADS_CONNECTOR_API__MAX_IN_FLIGHT: api.max_in_flight: ...``) or the
    file's line (``connector.yaml:12: routes.0.user.field: ...``); an unknown key gets the
    closest known one."""
    out = [f"invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            if parent is not None:
                message += suggest_key(str(err["loc"][-1]), parent)
        variable = env_source(err["loc"], ENV_PREFIX) if err["loc"] else None
        line = file_line(err["loc"], lines or {}) if err["loc"] else None
        if variable is not None:
            source = f"{variable}: "
        elif line is not None and path is not None:
            source = f"{path}:{line}: "
        else:
            source = ""
        out.append(f"  {source}{loc}: {message}")
    return "\n".join(out)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model that holds the field at ``loc`` (None inside lists and dicts
    of plain values)."""
    model: type[BaseModel] = ConnectorSettings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is list and args:
            annotation = args[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
