"""``connector check-config [--online] [--json]``: what ``run`` would refuse, and with
``--online`` whether the world it points at is ready.

Exit codes::

    0  everything checked is fine
    2  the configuration is refused (file, environment, or a file it names): run would
       not start, or would start not ready (an API key that cannot be sent, a Kafka
       secret or certificate it cannot read)
    3  the configuration is valid but an online check failed (brokers, topics, ACLs, API)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from connector import proxy
from connector.config import ENV_PREFIX, ConnectorSettings, load_settings, mask_url
from connector.errors import ConfigError
from connector.preflight import Check, Status, file_checks, load_checked

EXIT_OK, EXIT_CONFIG, EXIT_ONLINE = 0, 2, 3


def check_config(
    path: Path, *, online: bool = False, as_json: bool = False, files: bool = True
) -> int:
    try:
        settings = load_checked(path) if files else load_settings(path)
    except ConfigError as exc:
        if as_json:
            _emit_json(path, EXIT_CONFIG, [Check("config", Status.FAIL, str(exc))])
        else:
            sys.stderr.write(f"{path}: {exc}\n")
        return EXIT_CONFIG
    checks = file_checks(settings) if files else []
    code = EXIT_CONFIG if _failed(checks) else EXIT_OK
    if online and code == EXIT_OK:
        from connector.preflight_online import online_checks

        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries: ours say it
        found = asyncio.run(online_checks(settings))
        checks += found
        code = EXIT_ONLINE if _failed(found) else EXIT_OK
    if as_json:
        _emit_json(path, code, checks)
    else:
        _emit_text(path, settings, checks, code)
    return code


def _failed(checks: list[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


def _emit_json(path: Path, code: int, checks: list[Check]) -> None:
    document = {
        "config": str(path),
        "ok": code == EXIT_OK,
        "exit_code": code,
        "checks": [c.as_dict() for c in checks],
    }
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _emit_text(path: Path, settings: ConnectorSettings, checks: list[Check], code: int) -> None:
    k, d, a = settings.kafka, settings.delivery, settings.api
    verdict = "OK" if code == EXIT_OK else "PROBLEMS"
    out = [
        f"{path}: {verdict}",
        f"  kafka: {k.bootstrap_servers} group={k.group_id} inputs={','.join(k.input_topics)}"
        f" results={k.results_topic} dead-letters={k.dead_letter_topic}",
        f"  delivery: {d.mode.value}, ordering {d.ordering.value}, dedup {settings.dedup.store}",
        f"  api: {mask_url(a.base_url)} rate {a.rate_limit_per_s}/s for the group,"
        f" {a.max_in_flight} in flight",
        f"  routes: {len(settings.routes)}",
    ]
    for app in settings.app_uids():
        own, api = a.apps.get(app), a.for_app(app)
        key = "own key" if own is not None and own.has_key else "default key"
        out.append(
            f"  app {app}: {key}, rate {api.rate_limit_per_s}/s for the group,"
            f" {api.max_in_flight} in flight"
        )
    for topic, fmt in settings.input.topics.items():
        envelope = ", CloudEvents" if fmt.cloudevents else ""
        out.append(f"  input {topic}: {fmt.format}{envelope}")
    registry = settings.schema_registry
    if registry.url is not None:
        basic, bearer = registry.username, registry.bearer_token or registry.bearer_token_file
        auth = "basic auth" if basic else "bearer token" if bearer else "no auth"
        out.append(f"  schema registry: {registry.url} ({auth})")
    out += [f"  {line}" for line in environment_lines(settings)]
    out += [f"  {c.status.value:<7} {c.name}: {c.detail}" for c in checks]
    stream = sys.stdout if code == EXIT_OK else sys.stderr
    stream.write("\n".join(out) + "\n")


def environment_lines(settings: ConnectorSettings) -> list[str]:
    """What the environment adds to the file: the API's egress proxy (its credentials file
    named, never read here: the ``files`` checks do), the Kafka OAuth client, tracing."""
    try:
        found = proxy.resolve(settings.api, read_credentials=False)
        where = found.describe() if found is not None else "none (direct)"
    except ConfigError as exc:
        where = f"refused: {exc}"
    lines = [f"api proxy: {where}"]
    k = settings.kafka
    if k.sasl_mechanism == "OAUTHBEARER":
        scope = f", scope {k.oauth_scope!r}" if k.oauth_scope else ""
        source = k.oauth_client_secret_file or f"{ENV_PREFIX}KAFKA__OAUTH_CLIENT_SECRET"
        lines.append(
            f"kafka login: OAUTHBEARER, client {k.oauth_client_id} at "
            f"{mask_url(k.oauth_token_url or '')}{scope}, secret from {source}"
        )
    lines.append(f"tracing: {tracing_line(settings)}")
    return lines


def tracing_line(settings: ConnectorSettings) -> str:
    """Where spans would go and how they are sampled (the OTEL_* environment's values)."""
    if not settings.tracing.enabled:
        return "off"
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off (OTEL_SDK_DISABLED=true)"
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"
    )
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    if env.get("OTEL_TRACES_SAMPLER_ARG"):
        sampler += f" ({env['OTEL_TRACES_SAMPLER_ARG']})"
    service = env.get("OTEL_SERVICE_NAME") or settings.tracing.service_name
    return f"on, service {service}, OTLP/HTTP to {mask_url(endpoint)}, sampler {sampler}"
