"""``connector check-config`` refuses everything ``connector run`` would: each problem as a
message naming the field, never a traceback, never a secret."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.cli import EXIT_CONFIG, main
from connector.config import ENV_PREFIX

API_KEY = "key-7e6d5c-must-not-leak"
BASE: dict[str, Any] = {
    "api": {"base_url": "http://127.0.0.1:1", "request_timeout_s": 10},
    "delivery": {"drain_timeout_s": 20, "revoke_timeout_s": 15},
    "routes": [
        {
            "event_type": "order.shipped",
            "app_uid": "demo-app",
            "agent_uid": "agent-orders",
            "message_template": "Order ${data.orderId} shipped",
            "user": {"path": "user"},
        }
    ],
}


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", API_KEY)


def config(**changes: Any) -> dict[str, Any]:
    """BASE with ``section={field: value}`` merged in (``routes=[...]`` replaces)."""
    data = copy.deepcopy(BASE)
    for section, values in changes.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def route(**changes: Any) -> dict[str, Any]:
    return {**BASE["routes"][0], **changes}


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str]:
    path = tmp_path / "connector.yaml"
    path.write_text(text, encoding="utf-8")
    code = main(["check-config", "--config", str(path)])
    out = capsys.readouterr()
    both = out.out + out.err
    assert "Traceback" not in both
    assert API_KEY not in both
    return code, both


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Any) -> str:
    code, out = check(tmp_path, capsys, data if isinstance(data, str) else yaml.safe_dump(data))
    assert code == EXIT_CONFIG, out
    return out


def test_the_base_config_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path, capsys, yaml.safe_dump(config()))
    assert code == 0, out
    assert ": OK" in out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_template", "Order ${data.orderId shipped"),  # unclosed
        ("message_template", "Order ${1st} shipped"),  # not a name
        ("message_template", "costs 5$ only"),  # a lone $
        ("agent_uid", "agent::${data.session"),
        ("agent_uid", "agent::${data..session}"),
    ],
)
def test_route_template_syntax(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    out = refused(tmp_path, capsys, config(routes=[route(**{field: value})]))
    assert f"routes.0.{field}: " in out
    assert "malformed placeholder" in out


def test_deep_link_template_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config(results={"deep_link_template": "https://app/x?t=${threadUid"})
    out = refused(tmp_path, capsys, data)
    assert "results.deep_link_template: " in out


def test_dollar_escape_and_dotted_paths_are_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config(routes=[route(message_template="$$5 for ${data.items.0.sku} ($eventId)")])
    code, out = check(tmp_path, capsys, yaml.safe_dump(data))
    assert code == 0, out


def test_duplicate_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config(routes=[route(), route(agent_uid="other"), route(event_type="order.paid")])
    out = refused(tmp_path, capsys, data)
    assert "routes.1 duplicates routes.0" in out
    # another topic is another route
    data = config(routes=[route(), route(topic="billing")])
    code, out = check(tmp_path, capsys, yaml.safe_dump(data))
    assert code == 0, out


def test_a_section_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump(config()) + "api:\n  request_timeout_s: 10\n"
    out = refused(tmp_path, capsys, text)
    assert "api: given twice" in out


def test_a_nested_key_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump(config()).replace(
        "  request_timeout_s: 10\n", "  request_timeout_s: 10\n  request_timeout_s: 12\n"
    )
    assert text.count("request_timeout_s") == 2
    out = refused(tmp_path, capsys, text)
    assert "api.request_timeout_s: given twice" in out
    text = yaml.safe_dump(config()).replace(
        "  app_uid: demo-app\n", "  app_uid: demo-app\n  app_uid: other-app\n"
    )
    assert "routes.0.app_uid: given twice" in refused(tmp_path, capsys, text)


@pytest.mark.parametrize("field", ["drain_timeout_s", "revoke_timeout_s"])
def test_delivery_deadlines_exceed_the_request_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    out = refused(tmp_path, capsys, config(delivery={field: 10}))
    assert f"delivery.{field} (10) must exceed api.request_timeout_s (10)" in out


def test_other_timeout_relations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = refused(tmp_path, capsys, config(api={"backoff_initial_s": 40}))
    assert "api.backoff_initial_s must not exceed api.backoff_max_s" in out
    data = config(kafka={"session_timeout_ms": 5000, "heartbeat_interval_ms": 5000})
    out = refused(tmp_path, capsys, data)
    assert "kafka.heartbeat_interval_ms (5000) must be below kafka.session_timeout_ms" in out


def test_an_environment_list_that_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA__INPUT_TOPICS", "orders,billing")
    out = refused(tmp_path, capsys, config())
    assert f"{ENV_PREFIX}KAFKA__INPUT_TOPICS: not valid JSON" in out
    assert "orders,billing" not in out


def test_credentials_in_the_base_url_are_refused_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config(api={"base_url": "https://svc-user:hunter2-secret@api.example.com/"})
    out = refused(tmp_path, capsys, data)
    assert "api.base_url: " in out
    assert "https://***@api.example.com" in out
    assert "hunter2" not in out
    assert "svc-user" not in out


def test_client_certificate_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ssl = {"security_protocol": "SSL"}
    out = refused(tmp_path, capsys, config(kafka={**ssl, "ssl_certfile": "/c.pem"}))
    assert "ssl_certfile and ssl_keyfile go together" in out
    both = {"ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}
    out = refused(tmp_path, capsys, config(kafka=both))
    assert "ssl_certfile needs security_protocol SSL or SASL_SSL" in out
    out = refused(tmp_path, capsys, config(kafka={**ssl, **both, "ssl_key_password": "pw-x1"}))
    assert "kafka.ssl_key_password: secrets must not be written in the config file" in out
    assert "pw-x1" not in out
    # run would not start with files it cannot load: check-config says so, naming them
    out = refused(tmp_path, capsys, config(kafka={**ssl, **both}))
    assert "cannot load kafka.ssl_certfile /c.pem / kafka.ssl_keyfile /k.pem" in out


def test_run_refuses_what_check_config_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run`` stops with the same message before opening anything (no broker here)."""
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(config(routes=[route(), route()])), encoding="utf-8")
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "routes.1 duplicates routes.0" in err
    assert "Traceback" not in err


def test_run_stops_on_batch_settings_the_tracing_sdk_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` over the queue size: the SDK's ValueError left
    ``run`` as a traceback (exit status 1, a crash loop); now the configuration status and
    one line naming it. Before any broker is asked (none here)."""
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    path = tmp_path / "connector.yaml"
    data = config(tracing={"enabled": True}, server={"port": 0})
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr()
    both = err.out + err.err
    assert "max_export_batch_size must be less" in both
    assert "Traceback" not in both


# -- files that are no YAML text at all: a message, never a traceback (hostile round 2) -----


def check_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes) -> str:
    path = tmp_path / "connector.yaml"
    path.write_bytes(raw)
    code = main(["check-config", "--config", str(path)])
    out = capsys.readouterr()
    both = out.out + out.err
    assert "Traceback" not in both
    assert code == EXIT_CONFIG, both
    return both


def test_a_binary_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = check_bytes(tmp_path, capsys, b"\xe2\x28\xa1\x00\xff binary junk")
    assert "not UTF-8 text" in out


def test_a_latin1_file_is_refused_naming_the_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = yaml.safe_dump(config(kafka={"group_id": "caf\u00e9"}), allow_unicode=True)
    out = check_bytes(tmp_path, capsys, text.encode("latin-1"))
    assert "not UTF-8 text (byte" in out


@pytest.mark.parametrize(
    "text",
    ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "1" + "}" * 3000],
    ids=["lists", "mappings"],
)
def test_values_nested_thousands_deep_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    assert "nested too deeply" in check_bytes(tmp_path, capsys, text.encode())


def test_an_alias_bomb_is_refused_before_it_is_walked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nine levels of ten aliases: a billion values. The duplicate-key walk followed every
    alias, and check-config (and run) never ended; the expanded size is now counted with
    each shared node computed once, and refused."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    out = check_bytes(tmp_path, capsys, ("\n".join(lines) + "\n").encode())
    assert "aliases expand to" in out


def test_a_few_aliases_are_still_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config(routes=[route(), route(event_type="order.returned")])
    text = yaml.safe_dump(data)  # the two routes share their user mapping: an anchor
    assert "&id" in text and "*id" in text
    code, out = check(tmp_path, capsys, text)
    assert code == 0, out


# -- input formats and the schema registry -------------------------------------------------


def test_formats_and_registry_are_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}SCHEMA_REGISTRY__PASSWORD", "registry-pw-must-not-leak")
    data = config(
        kafka={"input_topics": ["orders", "ce"]},
        input={"topics": {"orders": {"format": "protobuf"}, "ce": {"cloudevents": True}}},
        schema_registry={"url": "https://registry:8081", "username": "svc"},
    )
    code, out = check(tmp_path, capsys, yaml.safe_dump(data))
    assert code == 0, out
    assert "input orders: protobuf\n" in out
    assert "input ce: json, CloudEvents\n" in out
    assert "schema registry: https://registry:8081 (basic auth)" in out
    assert "registry-pw-must-not-leak" not in out


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        (
            {"input": {"topics": {"orders": {"format": "avro"}}}},
            "input.topics.orders.format avro needs schema_registry.url",
        ),
        (
            {"input": {"topics": {"other": {"format": "json"}}}},
            "input.topics.other: not one of kafka.input_topics (orders)",
        ),
        ({"input": {"topics": {"orders": {"format": "xml"}}}}, "input.topics.orders.format"),
        (
            {"schema_registry": {"url": "http://u:p@registry:8081"}},
            "schema_registry.url: Value error, must not hold credentials (http://***@registry",
        ),
        ({"schema_registry": {"url": "registry:8081"}}, "schema_registry.url"),
        (
            {"schema_registry": {"url": "http://r:1", "username": "svc"}},
            "schema_registry.username needs THREADS_CONNECTOR_SCHEMA_REGISTRY__PASSWORD",
        ),
        ({"results": {"forward_headers": ["Correlation-Id"]}}, "connector's own result header"),
        ({"input": {"correlation_id_header": ""}}, "input.correlation_id_header"),
    ],
)
def test_format_settings_are_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], words: str
) -> None:
    out = refused(tmp_path, capsys, config(kafka={"input_topics": ["orders"]}, **changes))
    assert words in out
    assert "u:p@" not in out


def test_registry_secrets_are_refused_in_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("password", "bearer_token"):
        data = config(schema_registry={"url": "http://r:1", name: "s3cret-in-file"})
        out = refused(tmp_path, capsys, data)
        assert f"schema_registry.{name}: secrets must not be written in the config file" in out
        assert "s3cret-in-file" not in out


def test_the_api_proxy_is_shown_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://corp:pw-must-not-leak@egress:3128")
    code, out = check(tmp_path, capsys, yaml.safe_dump(config()))
    assert code == 0, out
    assert "api proxy: http://egress:3128 (from HTTP_PROXY) as 'corp'" in out
    assert "pw-must-not-leak" not in out
    # the credentials file is read as run reads it (run refuses to start without it)
    auth = tmp_path / "proxy-auth"
    with_auth = yaml.safe_dump(config(api={"proxy_auth_file": str(auth)}))
    auth.write_text("corp:file-pw-must-not-leak\n")
    code, out = check(tmp_path, capsys, with_auth)
    assert code == 0, out
    assert "ok      api proxy: http://egress:3128 (from HTTP_PROXY) as 'corp'" in out
    assert "file-pw-must-not-leak" not in out
    auth.unlink()
    out = refused(tmp_path, capsys, with_auth)
    assert f"api.proxy_auth_file: cannot read {auth}" in out
    monkeypatch.setenv("HTTP_PROXY", "https://egress:3128")
    assert "HTTP_PROXY: https://egress:3128 is not an http:// proxy URL" in refused(
        tmp_path, capsys, config()
    )


def oauth_kafka(**extra: Any) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "OAUTHBEARER",
        "oauth_token_url": "https://login.example.com/token",
        "oauth_client_id": "threads-connector",
        **extra,
    }


def test_oauthbearer_is_shown_with_where_its_secret_comes_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("oauth-secret-must-not-leak\n")
    data = config(kafka=oauth_kafka(oauth_client_secret_file=str(secret), oauth_scope="kafka"))
    code, out = check(tmp_path, capsys, yaml.safe_dump(data))
    assert code == 0, out
    assert (
        "kafka login: OAUTHBEARER, client threads-connector at https://login.example.com/token"
        f", scope 'kafka', secret from {secret}" in out
    )
    assert "ok      kafka: kafka.oauth_client_secret: readable" in out
    assert "oauth-secret-must-not-leak" not in out
    secret.unlink()  # run would start not ready (a Kafka failure): check-config says so
    out = refused(tmp_path, capsys, data)
    assert "fail    kafka: kafka.oauth_client_secret_file: cannot read" in out


@pytest.mark.parametrize(
    ("kafka", "message"),
    [
        (oauth_kafka(oauth_token_url=None), "needs oauth_token_url and oauth_client_id"),
        (oauth_kafka(), "kafka.oauth_client_secret"),  # no secret at all
        (
            oauth_kafka(oauth_token_url="https://u:pw@login.example.com/token"),
            "must not hold credentials",
        ),
        (oauth_kafka(sasl_mechanism="PLAIN"), "only used with OAUTHBEARER"),
    ],
)
def test_oauthbearer_settings_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kafka: dict[str, Any], message: str
) -> None:
    out = refused(tmp_path, capsys, config(kafka=kafka))
    assert message in out and ":pw@" not in out


def test_the_oauth_client_secret_in_the_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = refused(tmp_path, capsys, config(kafka=oauth_kafka(oauth_client_secret="s3cr3t")))
    assert "kafka.oauth_client_secret: secrets must not be written" in out
    assert "s3cr3t" not in out


def test_tracing_is_shown_with_the_otel_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    code, out = check(tmp_path, capsys, yaml.safe_dump(config()))
    assert code == 0 and "  tracing: off\n" in out
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    code, out = check(tmp_path, capsys, yaml.safe_dump(config(tracing={"enabled": True})))
    assert code == 0, out
    assert (
        "tracing: on, service threads-connector, OTLP/HTTP to http://collector:4318/v1/traces, "
        "sampler parentbased_traceidratio (0.1)"
    ) in out
# -- every file and variable run reads, attributed to where it came from (issue 21.2) ----


def write_config(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "connector.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(config()), encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_an_unreadable_key_file_is_refused_by_both(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    monkeypatch.delenv(f"{ENV_PREFIX}API__API_KEY")
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY_FILE", "/nonexistent/key")
    assert main([command, "--config", str(write_config(tmp_path))]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "api.api_key_file: cannot read /nonexistent/key" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("content", "problem"), [(b"\n", "it is empty"), (b"a\nb", "line break")])
def test_a_key_file_that_cannot_be_sent_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
    problem: str,
) -> None:
    key = tmp_path / "key"
    key.write_bytes(content)
    monkeypatch.delenv(f"{ENV_PREFIX}API__API_KEY")
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY_FILE", str(key))
    assert main(["check-config", "--config", str(write_config(tmp_path))]) == EXIT_CONFIG
    out = capsys.readouterr()
    assert "fail    key: app demo-app" in out.err
    assert problem in out.err


def test_a_missing_ca_bundle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config(kafka={"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"})
    out = refused(tmp_path, capsys, data)
    assert "kafka.ssl_cafile: cannot load the CA bundle" in out
    out = refused(tmp_path, capsys, config(api={"ca_file": "/nonexistent/api-ca.pem"}))
    assert "api.ca_file: cannot load the CA bundle" in out


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA__BOOTSTRAP_SERVERS"),
        ("KAFKA__BOOTSTRAP_SERVER", "KAFKA__BOOTSTRAP_SERVERS"),
        ("API__APPS__APP-A__RATE_LIMIT", "API__APPS__APP-A__RATE_LIMIT_PER_S"),
    ],
)
def test_an_unknown_variable_is_named_with_the_one_meant(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    meant: str,
) -> None:
    monkeypatch.setenv(ENV_PREFIX + variable, "kafka-1:9092")
    out = refused(tmp_path, capsys, config())
    assert f"{ENV_PREFIX}{variable}: no setting reads this environment variable" in out
    assert f"did you mean {ENV_PREFIX}{meant}?" in out
    assert "kafka-1" not in out  # values are never quoted


def test_tooling_variables_are_not_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}CACHE", str(tmp_path))
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-A__API_KEY", "k-a")
    code, out = check(tmp_path, capsys, yaml.safe_dump(config()))
    assert code == 0, out


def test_a_bad_value_is_blamed_on_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__MAX_IN_FLIGHT", "abc")
    out = refused(tmp_path, capsys, config(api={"max_in_flight": 5}))
    assert f"  {ENV_PREFIX}API__MAX_IN_FLIGHT: api.max_in_flight: Input should be" in out


def test_a_bad_value_in_the_file_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = yaml.safe_dump(config(api={"max_in_flight": "abc"}, kafka={"bootstrap_server": "x"}))
    lines = text.splitlines()
    in_flight = next(i for i, line in enumerate(lines, 1) if "max_in_flight" in line)
    extra = next(i for i, line in enumerate(lines, 1) if "bootstrap_server" in line)
    out = refused(tmp_path, capsys, text)
    path = tmp_path / "connector.yaml"
    assert f"  {path}:{in_flight}: api.max_in_flight: Input should be" in out
    assert f"  {path}:{extra}: kafka.bootstrap_server: Extra inputs are not permitted" in out
    assert "did you mean bootstrap_servers?" in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    assert main(["check-config", "--json", "--config", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True and document["exit_code"] == 0
    assert {"name": "key", "status": "ok", "detail": "app demo-app: API key readable"} in (
        document["checks"]
    )
    path.write_text(yaml.safe_dump(config(routes=[route(), route()])), encoding="utf-8")
    assert main(["check-config", "--json", "--config", str(path)]) == EXIT_CONFIG
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["exit_code"] == EXIT_CONFIG
    assert "routes.1 duplicates routes.0" in document["checks"][0]["detail"]


def test_skip_files_checks_a_config_rendered_for_a_pod(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's ConfigMap names files only the pod mounts: checked elsewhere, they are
    left out on request (and only then)."""
    monkeypatch.delenv(f"{ENV_PREFIX}API__API_KEY")
    data = config(api={"api_key_file": "/var/run/secrets/threads-connector/api-key"})
    path = write_config(tmp_path, yaml.safe_dump(data))
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG
    assert "cannot read /var/run/secrets/threads-connector/api-key" in capsys.readouterr().err
    assert main(["check-config", "--skip-files", "--config", str(path)]) == 0
    assert ": OK" in capsys.readouterr().out


def test_a_missing_kafka_ca_bundle_is_named_where_run_reports_it(tmp_path: Path) -> None:
    """run keeps a Kafka credential problem a state (readiness red, retried): the missing
    CA file is named as such, not as 'unreachable: No such file or directory'."""
    from connector.config import load_settings
    from connector.errors import ConfigError
    from connector.kafka_common import client_kwargs, describe_failure

    data = config(kafka={"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"})
    settings = load_settings(write_config(tmp_path, yaml.safe_dump(data)))
    with pytest.raises(ConfigError) as caught:
        client_kwargs(settings)
    assert describe_failure(caught.value) == (
        "credentials: kafka.ssl_cafile: cannot load the CA bundle /nonexistent/ca.pem: "
        "No such file or directory"
    )


def test_registry_files_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config(
        schema_registry={
            "url": "https://r:1",
            "username": "svc",
            "password_file": str(tmp_path / "missing"),
            "ca_file": str(tmp_path / "missing-ca.pem"),
        }
    )
    code, out = check(tmp_path, capsys, yaml.safe_dump(data))
    assert code == EXIT_CONFIG, out
    assert "registry: schema_registry.password_file: cannot read" in out
    assert "registry: schema_registry.ca_file: cannot load the CA bundle" in out
