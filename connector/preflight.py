"""What ``run`` reads before it opens anything, checked the same way by ``check-config``.

``load_checked`` is the one validation both commands share: the settings (file and
environment, ``config.load_settings``), then every file the settings name (API keys,
SASL and key passwords, CA bundles, the client certificate): readable, non-empty, usable.
``check-config`` reports every problem; ``run`` refuses to start on the API's files (an
API key file it cannot read, an ``api.ca_file`` it cannot load) and leaves the others to
the state they put it in, as a red ``/readyz`` that heals once the file is fixed: an
unusable key value pauses that app's calls, a Kafka secret or certificate that cannot be
read is a Kafka failure (retried, named by readiness: a Kafka failure is a state, not an
exit).

``--online`` adds ``preflight_online``: the world the settings point at.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import SecretStr

from connector import proxy
from connector.config import ConnectorSettings, _secret, load_settings
from connector.errors import ApiKeyInvalid, ConfigError
from connector.kafka_common import ssl_context
from connector.threads_client import tls_context


class Status(StrEnum):
    OK = "ok"
    FAIL = "fail"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One thing checked: what (``name``), how it went, and a line an operator acts on."""

    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def load_checked(path: Path | None) -> ConnectorSettings:
    """The settings, with every file they name readable and loadable; ConfigError naming
    each problem otherwise (what ``run`` refuses)."""
    settings = load_settings(path)
    fatal = [
        c.detail for c in file_checks(settings) if c.status is Status.FAIL and c.name == "files"
    ]
    if fatal:
        raise ConfigError(
            f"invalid configuration ({len(fatal)} problem(s)):\n  " + "\n  ".join(fatal)
        )
    return settings


def file_checks(settings: ConnectorSettings) -> list[Check]:
    """Each secret and certificate file the settings name: ``files`` for what ``run``
    refuses to start with, ``key`` for an API key value that cannot be sent, ``kafka``
    for Kafka's secrets and certificates (``run`` shows both as a red readiness)."""
    checks = [_key_check(settings, app) for app in settings.app_uids()]
    k = settings.kafka
    kafka: list[Check] = []
    if k.sasl_mechanism == "OAUTHBEARER":
        kafka.append(_secret_check("kafka.oauth_client_secret", settings.oauth_client_secret))
    elif k.sasl_mechanism:
        kafka.append(_secret_check("kafka.sasl_password", settings.sasl_password))
    if k.ssl_key_password is not None or k.ssl_key_password_file is not None:
        kafka.append(_secret_check("kafka.ssl_key_password", settings.ssl_key_password))
    if k.security_protocol.endswith("SSL"):
        kafka.append(_tls_check("kafka TLS", lambda: ssl_context(settings), "kafka.ssl_cafile"))
    checks += [Check("kafka", c.status, c.detail) for c in kafka]
    checks.append(_proxy_check(settings))
    if settings.api.ca_file is not None:
        ca_file = settings.api.ca_file
        checks.append(_tls_check("api TLS", lambda: tls_context(ca_file), "api.ca_file"))
    checks += [Check("registry", c.status, c.detail) for c in _registry_checks(settings)]
    return checks


def _registry_checks(settings: ConnectorSettings) -> list[Check]:
    """The schema registry's secret and CA files (``run`` shows a problem as a red
    readiness naming the file, once a schema is needed)."""
    r = settings.schema_registry
    found: list[Check] = []
    for name, value, path in (
        ("password", r.password, r.password_file),
        ("bearer_token", r.bearer_token, r.bearer_token_file),
    ):
        if value is not None or path is not None:
            field = f"schema_registry.{name}"
            found.append(_secret_check(field, _reader(value, path, f"{field}_file")))
    if r.ca_file is not None:
        ca_file = r.ca_file
        found.append(
            _tls_check(
                "schema registry TLS",
                lambda: ssl.create_default_context(cafile=str(ca_file)),
                "schema_registry.ca_file",
            )
        )
    return found


def _reader(value: SecretStr | None, path: Path | None, name: str) -> Callable[[], SecretStr]:
    return lambda: _secret(value, path, name)


def _proxy_check(settings: ConnectorSettings) -> Check:
    """The API's egress proxy: its credentials file readable (``run`` refuses to start
    without it, like an API key file), an environment proxy URL that is one."""
    try:
        found = proxy.resolve(settings.api)
    except ConfigError as exc:
        return Check("files", Status.FAIL, str(exc))
    return Check("api proxy", Status.OK, found.describe() if found else "none (direct)")


def _key_check(settings: ConnectorSettings, app: str) -> Check:
    try:
        settings.app_key(app)()
    except ConfigError as exc:
        return Check("files", Status.FAIL, str(exc))
    except ApiKeyInvalid as exc:
        return Check("key", Status.FAIL, f"app {app}: {exc}")
    return Check("key", Status.OK, f"app {app}: API key readable")


def _secret_check(name: str, read: Callable[[], SecretStr | None]) -> Check:
    try:
        secret = read()
    except ConfigError as exc:
        return Check("files", Status.FAIL, str(exc))
    if secret is None or not secret.get_secret_value():
        return Check("key", Status.FAIL, f"{name}: the secret is empty")
    return Check("files", Status.OK, f"{name}: readable")


def _tls_check(name: str, load: Callable[[], ssl.SSLContext], field: str) -> Check:
    try:
        load()
    except ConfigError as exc:
        return Check("files", Status.FAIL, str(exc))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        return Check("files", Status.FAIL, f"{field}: cannot load the CA bundle: {reason}")
    return Check("files", Status.OK, f"{name}: certificates load")
