"""connector.config: the YAML file, environment overrides, secrets and error messages."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from connector.config import (
    ENV_PREFIX,
    ApiSettings,
    CachedSecret,
    ConnectorSettings,
    DeliveryMode,
    KafkaSettings,
    Ordering,
    load_settings,
)
from connector.errors import ApiKeyInvalid, ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "connector.yaml"
API_KEY = "key-0f1e2d3c-must-not-leak"
SASL_PASSWORD = "sasl-9a8b7c-must-not-leak"

ROUTE: dict[str, Any] = {
    "event_type": "order.shipped",
    "app_uid": "demo-app",
    "agent_uid": "agent-orders",
    "message_template": "Order ${data.orderId} shipped",
    "user": {"path": "user"},
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No THREADS_CONNECTOR_* variable from the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", API_KEY)


def write(tmp_path: Path, data: Any, name: str = "connector.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# -- reading the file ----------------------------------------------------------------------


def test_minimal_file_takes_defaults(tmp_path: Path, api_key_env: None) -> None:
    settings = load_settings(write(tmp_path, {"routes": [ROUTE]}))

    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.input_topics == ["domain-events"]
    assert settings.delivery.mode is DeliveryMode.EXACTLY_ONCE
    assert settings.delivery.ordering is Ordering.UNORDERED
    assert settings.api.max_attempts == 6
    route = settings.routes[0]
    assert route.topic == "*"
    assert route.message_type == "system"
    assert route.user.field is None
    assert route.user.path == "user"


def test_yaml_values_are_used(tmp_path: Path, api_key_env: None) -> None:
    data = {
        "kafka": {"bootstrap_servers": "broker-a:9092", "input_topics": ["a", "b"]},
        "delivery": {"mode": "at_least_once", "ordering": "key"},
        "api": {"base_url": "http://api.local:8080/", "max_attempts": 2},
        "routes": [ROUTE],
    }
    settings = load_settings(write(tmp_path, data))

    assert settings.kafka.bootstrap_servers == "broker-a:9092"
    assert settings.kafka.input_topics == ["a", "b"]
    assert settings.delivery.mode is DeliveryMode.AT_LEAST_ONCE
    assert settings.delivery.ordering is Ordering.KEY
    assert settings.api.base_url == "http://api.local:8080"  # trailing slash dropped
    assert settings.api.max_attempts == 2


def test_settings_are_frozen(tmp_path: Path, api_key_env: None) -> None:
    settings = load_settings(write(tmp_path, {"routes": [ROUTE]}))
    with pytest.raises(ValidationError):
        settings.kafka.__setattr__("bootstrap_servers", "elsewhere:9092")
    with pytest.raises(ValidationError):
        settings.__setattr__("event_type_field", "kind")


def test_environment_overrides_yaml(
    tmp_path: Path, api_key_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = {
        "kafka": {"bootstrap_servers": "yaml-broker:9092", "group_id": "from-yaml"},
        "api": {"max_attempts": 5},
        "routes": [ROUTE],
    }
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS", "env-broker:9092")
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA__INPUT_TOPICS", '["x", "y"]')
    monkeypatch.setenv(f"{ENV_PREFIX}API__MAX_ATTEMPTS", "3")
    monkeypatch.setenv(f"{ENV_PREFIX}DELIVERY__MODE", "at_least_once")

    settings = load_settings(write(tmp_path, data))

    assert settings.kafka.bootstrap_servers == "env-broker:9092"
    assert settings.kafka.input_topics == ["x", "y"]
    assert settings.api.max_attempts == 3
    assert settings.delivery.mode is DeliveryMode.AT_LEAST_ONCE
    # fields the environment does not name keep their YAML values (a deep merge)
    assert settings.kafka.group_id == "from-yaml"
    assert settings.routes[0].app_uid == "demo-app"


def test_environment_value_is_validated(
    tmp_path: Path, api_key_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA__TOPIC_PARTITIONS", "0")
    message = config_error(write(tmp_path, {"routes": [ROUTE]}))
    assert "kafka.topic_partitions" in message


# -- secrets -------------------------------------------------------------------------------


def test_api_key_from_environment(tmp_path: Path, api_key_env: None) -> None:
    settings = load_settings(write(tmp_path, {"routes": [ROUTE]}))
    assert settings.api_key()().get_secret_value() == API_KEY


def test_api_key_from_mounted_file(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("  file-key-123\n", encoding="utf-8")
    data = {"api": {"api_key_file": str(key_file)}, "routes": [ROUTE]}

    settings = load_settings(write(tmp_path, data))

    assert settings.api.api_key is None
    assert settings.api_key()().get_secret_value() == "file-key-123"


def test_unreadable_api_key_file_names_the_field(tmp_path: Path) -> None:
    data = {"api": {"api_key_file": str(tmp_path / "absent")}, "routes": [ROUTE]}
    settings = load_settings(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"api\.api_key_file"):
        settings.api_key()


def test_missing_api_key_is_refused(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, {"routes": [ROUTE]}))
    assert "api.api_key" in message
    assert f"{ENV_PREFIX}API__API_KEY" in message


@pytest.mark.parametrize(
    ("section", "name", "secret"),
    [("api", "api_key", API_KEY), ("kafka", "sasl_password", SASL_PASSWORD)],
)
def test_secret_written_in_yaml_is_refused(
    tmp_path: Path, api_key_env: None, section: str, name: str, secret: str
) -> None:
    data: dict[str, Any] = {section: {name: secret}, "routes": [ROUTE]}
    message = config_error(write(tmp_path, data))

    assert message.startswith(f"{section}.{name}:")
    assert f"{ENV_PREFIX}{section.upper()}__{name.upper()}" in message
    assert secret not in message


def test_repr_and_dump_do_not_leak_secrets(
    tmp_path: Path, api_key_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    data = {
        "kafka": {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
        },
        "routes": [ROUTE],
    }
    settings = load_settings(write(tmp_path, data))

    for text in (repr(settings), str(settings), repr(settings.api), settings.model_dump_json()):
        assert API_KEY not in text
        assert SASL_PASSWORD not in text
    # ...while the values stay usable
    assert settings.api_key()().get_secret_value() == API_KEY
    password = settings.sasl_password()
    assert password is not None
    assert password.get_secret_value() == SASL_PASSWORD


# -- errors name their fields --------------------------------------------------------------


def test_each_bad_field_is_named_by_its_path(tmp_path: Path, api_key_env: None) -> None:
    bad_route = {**ROUTE, "user": {"field": "email", "path": "user.email"}}
    data = {
        "kafka": {"topic_partitions": 0},
        "api": {"base_url": "ftp://api.example.com"},
        "routes": [ROUTE, bad_route],
    }
    message = config_error(write(tmp_path, data))

    assert "3 problem" in message
    assert "kafka.topic_partitions" in message
    assert "api.base_url" in message
    assert "routes.1.user.field" in message
    assert "routes.0" not in message


def test_route_missing_fields_are_named(tmp_path: Path, api_key_env: None) -> None:
    route = {"event_type": "x", "agent_uid": "a", "message_template": "m"}
    message = config_error(write(tmp_path, {"routes": [route]}))
    assert "routes.0.app_uid" in message
    assert "routes.0.user" in message


def test_unknown_field_is_rejected(tmp_path: Path, api_key_env: None) -> None:
    data = {"kafka": {"bootstrap_server": "typo:9092"}, "routes": [ROUTE]}
    assert "kafka.bootstrap_server" in config_error(write(tmp_path, data))


def test_routes_are_required(tmp_path: Path, api_key_env: None) -> None:
    assert "routes" in config_error(write(tmp_path, {"kafka": {"group_id": "g"}}))
    assert "routes" in config_error(write(tmp_path, {"routes": []}))


def test_sasl_without_mechanism_is_rejected(tmp_path: Path, api_key_env: None) -> None:
    data = {"kafka": {"security_protocol": "SASL_SSL"}, "routes": [ROUTE]}
    message = config_error(write(tmp_path, data))
    assert "kafka" in message
    assert "sasl_mechanism" in message


def test_sasl_mechanism_needs_a_password(tmp_path: Path, api_key_env: None) -> None:
    data = {
        "kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
        "routes": [ROUTE],
    }
    assert "kafka.sasl_password" in config_error(write(tmp_path, data))


def test_api_base_url_must_be_http() -> None:
    assert ApiSettings(base_url="https://api.example.com/").base_url == "https://api.example.com"
    with pytest.raises(ValidationError, match="base_url"):
        ApiSettings(base_url="api.example.com")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("kafka: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_malformed_file(tmp_path: Path, api_key_env: None, content: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    assert expected in config_error(path)


def test_missing_file(tmp_path: Path, api_key_env: None) -> None:
    assert "cannot read config file" in config_error(tmp_path / "nope.yaml")


# -- the shipped file ----------------------------------------------------------------------


def test_shipped_config_loads(api_key_env: None) -> None:
    settings = load_settings(SHIPPED)

    assert settings.api_key()().get_secret_value() == API_KEY
    assert settings.kafka.input_topics == ["domain-events"]
    assert [r.event_type for r in settings.routes] == [
        "order.shipped",
        "onboarding.milestone",
        "compliance.deadline",
        "ticket.resolved",
    ]
    assert {r.user.field for r in settings.routes} == {
        None,
        "humanUid",
        "sdkUserEmail",
        "externalUserId",
    }


# -- the API key, checked where it is read ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("abc\nSECRET-PART", "line break"),
        ("abc\rSECRET-PART", "line break"),
        ("abc\x00SECRET-PART", "control character"),
        ("abc-SECRET-PARTé", "non-ASCII"),
        ("abc-SECRET-PART\u2603", "non-ASCII"),
        ("  \n", "empty"),
    ],
)
def test_an_unusable_key_file_names_the_file_never_the_value(
    tmp_path: Path, raw: str, problem: str
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(raw, encoding="utf-8")
    secret = CachedSecret(None, key_file, "api.api_key_file", refresh_s=3600)
    with pytest.raises(ApiKeyInvalid) as info:
        secret()
    message = str(info.value)
    assert str(key_file) in message and problem in message
    assert "SECRET" not in message and "abc" not in message


def test_an_unusable_key_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", "abc\nSECRET-PART")
    settings = ConnectorSettings(routes=[ROUTE])
    with pytest.raises(ApiKeyInvalid) as info:
        settings.api_key()()
    assert f"{ENV_PREFIX}API__API_KEY" in str(info.value)
    assert "SECRET" not in str(info.value)


def test_surrounding_whitespace_and_a_trailing_newline_are_stripped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", " good-key\n")
    assert ConnectorSettings(routes=[ROUTE]).api_key()().get_secret_value() == "good-key"


def test_a_fixed_key_file_heals(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("bad\nkey", encoding="utf-8")
    secret = CachedSecret(None, key_file, "api.api_key_file", refresh_s=0.01)
    with pytest.raises(ApiKeyInvalid):
        secret()
    key_file.write_text("good-key\n", encoding="utf-8")
    time.sleep(0.02)  # past the refresh interval
    assert secret().get_secret_value() == "good-key"


@pytest.mark.parametrize("app", [".", ".."])
def test_an_app_uid_that_is_a_dot_segment_is_refused(
    tmp_path: Path, api_key_env: None, app: str
) -> None:
    """``..`` is percent-encoded into the path as it is (``.`` is unreserved) and every
    URL library then removes the dot segment: POST /api/v1/appuid/../threads went to
    /api/v1/threads with the app's key. Refused in a route and as an ``api.apps`` name."""
    message = config_error(write(tmp_path, {"routes": [{**ROUTE, "app_uid": app}]}))
    assert "routes.0.app_uid" in message and "dot segment" in message
    data = {"api": {"apps": {app: {"rate_limit_per_s": 5}}}, "routes": [ROUTE]}
    message = config_error(write(tmp_path, data))
    assert "api.apps" in message and "dot segment" in message


def test_a_key_file_that_is_not_utf8_is_an_unusable_key_never_quoted(tmp_path: Path) -> None:
    """Read at start-up or re-read after a rotation, bytes that are not UTF-8 raised
    UnicodeDecodeError (quoting a byte of the key) instead of pausing calls."""
    key_file = tmp_path / "api-key"
    key_file.write_bytes(b"caf\xe9-SECRET")
    secret = CachedSecret(None, key_file, "api.api_key_file", refresh_s=0.01)
    with pytest.raises(ApiKeyInvalid) as info:
        secret()
    assert str(key_file) in str(info.value) and "not UTF-8" in str(info.value)
    assert "xe9" not in str(info.value) and "SECRET" not in str(info.value)
    key_file.write_text("good-key\n", encoding="utf-8")
    time.sleep(0.02)  # past the refresh interval
    assert secret().get_secret_value() == "good-key"
    key_file.write_bytes(b"\xff\xfe-SECRET")  # rotated to a bad value while running
    time.sleep(0.02)
    with pytest.raises(ApiKeyInvalid):
        secret()


def test_a_kafka_password_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    password = tmp_path / "sasl-password"
    password.write_bytes(b"p\xe9-SECRET")
    settings = ConnectorSettings(
        api={"api_key": "k"},
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "u",
            "sasl_password_file": password,
        },
        routes=[ROUTE],
    )
    with pytest.raises(ConfigError) as info:
        settings.sasl_password()
    assert "kafka.sasl_password_file" in str(info.value) and "not UTF-8" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("url", ["https://gw.example/mindset?x=1", "https://gw.example/#a"])
def test_a_base_url_with_a_query_or_fragment_is_refused(
    tmp_path: Path, api_key_env: None, url: str
) -> None:
    """The API's path is appended to the base URL: after a query or a fragment it would
    be part of them (every call to the gateway's root)."""
    message = config_error(write(tmp_path, {"api": {"base_url": url}, "routes": [ROUTE]}))
    assert "api.base_url" in message and "query" in message


@pytest.mark.parametrize(
    ("instance", "static_members", "joins_as"),
    [
        (None, None, None),
        ("conn-2", None, "conn-2"),  # every replica static
        ("conn-1", 2, "conn-1"),  # below the autoscaler's minimum: static
        ("conn-2", 2, None),  # an autoscaler's extra: dynamic, leaves when it stops
    ],
)
def test_static_membership_by_ordinal(
    instance: str | None, static_members: int | None, joins_as: str | None
) -> None:
    kafka = KafkaSettings(group_instance_id=instance, static_members=static_members)
    assert kafka.static_instance_id() == joins_as


def test_static_members_needs_an_ordinal_and_names_the_field() -> None:
    with pytest.raises(ValidationError, match="static_members needs a group_instance_id"):
        KafkaSettings(group_instance_id="conn", static_members=2)
