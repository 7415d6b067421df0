"""Settings: one YAML file validated by pydantic, every field overridable from the environment.

Precedence, highest first: environment (``THREADS_CONNECTOR_<SECTION>__<FIELD>``), then
the YAML file, then the defaults below. Secrets (the API key, the SASL password) come only
from the environment or from mounted files (``*_file`` fields); a secret written into the
YAML file stops start-up.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
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
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connector.errors import ApiKeyInvalid, ConfigError

ENV_PREFIX = "THREADS_CONNECTOR_"
IDENTIFIER_FIELDS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")
_SECRET_FIELDS = {("api", "api_key"), ("kafka", "sasl_password")}


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
    create_topics: bool = True
    topic_partitions: int = Field(default=6, ge=1, description="for topics the connector creates")
    replication_factor: int = Field(default=1, ge=1)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    fetch_max_records: int = Field(default=500, ge=1)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and not self.sasl_mechanism:
            raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
        return self


class DeliverySettings(_Frozen):
    """Delivery semantics, commit cadence, ordering and lifecycle deadlines."""

    mode: DeliveryMode = DeliveryMode.EXACTLY_ONCE
    ordering: Ordering = Ordering.UNORDERED
    commit_interval_ms: int = Field(default=250, ge=10)
    transactional_id_prefix: str = "threads-connector"
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)
    max_buffered_events: int = Field(default=2_000, ge=1, description="pause fetching above")
    drain_timeout_s: float = Field(default=70.0, gt=0)
    revoke_timeout_s: float = Field(default=65.0, gt=0)


class DedupSettings(_Frozen):
    """Deduplication by event id, scoped to the consumer group."""

    store: Literal["changelog", "memory"] = "changelog"
    event_id_field: str = "id"
    event_id_header: str = "event-id"
    ttl_s: float = Field(default=86_400.0, gt=0)
    max_entries: int = Field(default=1_000_000, ge=1)
    changelog_suffix: str = "dedup-changelog"
    restore_timeout_s: float = Field(default=120.0, gt=0)


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
    max_retry_after_s: float = Field(default=300.0, gt=0, description="cap on Retry-After")
    max_pause_ready_s: float = Field(
        default=60.0, gt=0, description="a longer Retry-After pause turns /readyz red"
    )
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="transport failures in a row that pause calls"
    )
    breaker_probe_interval_s: float = Field(default=5.0, gt=0, description="while paused")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
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


class ResultSettings(_Frozen):
    deep_link_template: str = "https://app.example.com/agent?thread=${threadUid}"


class ServerSettings(_Frozen):
    host: str = "0.0.0.0"
    port: int = Field(default=9464, ge=0, le=65535)


class LogSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


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
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LogSettings = Field(default_factory=LogSettings)

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
        if self.api.api_key is None and self.api.api_key_file is None:
            raise ValueError(
                f"api.api_key is required: set {ENV_PREFIX}API__API_KEY "
                f"or api.api_key_file (a mounted secret file)"
            )
        if self.kafka.sasl_mechanism and not (
            self.kafka.sasl_password or self.kafka.sasl_password_file
        ):
            raise ValueError("kafka.sasl_password (env) or kafka.sasl_password_file is required")
        return self

    def api_key(self) -> CachedSecret:
        """The API key provider (environment, or the mounted file re-read periodically)."""
        return CachedSecret(
            self.api.api_key, self.api.api_key_file, "api.api_key_file", self.api.secret_refresh_s
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
        self._cached, self._problem = _checked(_secret(value, path, name))
        self._read_at = time.monotonic()

    def __call__(self) -> SecretStr:
        if self._value is None and time.monotonic() - self._read_at > self._refresh_s:
            self._read_at = time.monotonic()
            # keep the last value read while the file cannot be read (being replaced)
            with contextlib.suppress(ConfigError):
                self._cached, self._problem = _checked(_secret(None, self._path, self._name))
        if self._problem is not None:
            raise ApiKeyInvalid(f"the API key from {self._source} cannot be sent: {self._problem}")
        return self._cached


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
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from exc


def load_settings(path: Path | None) -> ConnectorSettings:
    """Read, merge with the environment and validate; raise ConfigError naming each field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
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
    try:
        return ConnectorSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per offending field: ``routes.0.user.field: Input should be ...``."""
    lines = [f"invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
