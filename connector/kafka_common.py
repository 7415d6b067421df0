"""Connection settings shared by every Kafka client the connector opens, and what went wrong.

``client_kwargs`` builds bootstrap, client id and security (TLS with an optional client
certificate, SASL) for aiokafka clients. ``diagnose`` / ``describe_failure`` turn a failure
to reach Kafka into one line an operator can act on::

    unreachable            the address does not resolve, refuses, or does not answer
    authentication failed  SASL user or password refused, or the OAUTHBEARER token
    OAuth token            no token from the identity provider (connector.oauth)
    TLS verification failed  the broker's certificate is not trusted / names another host
    TLS handshake failed   e.g. the broker requires a client certificate we did not send
    client certificate     ssl_certfile / ssl_keyfile / key password cannot be loaded
    not authorized         ACLs refuse an operation
    topics                 a topic check failed (missing input topic, changelog layout)

aiokafka reports a bootstrap failure as ``KafkaConnectionError("Unable to bootstrap")`` and
only logs the cause: ``diagnose`` opens one connection itself to find it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)

from connector import oauth
from connector.config import ConnectorSettings
from connector.errors import ConfigError

log = logging.getLogger(__name__)
_AUTHORIZATION = (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


class ClientCertificateError(ConfigError):
    """The client certificate, its key, or the key's password cannot be loaded."""


def ssl_context(settings: ConnectorSettings) -> ssl.SSLContext:
    """Verify the broker (CA bundle or the system's, host name unless turned off) and
    present a client certificate when one is configured (mTLS)."""
    k = settings.kafka
    try:
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
    except (OSError, ssl.SSLError) as exc:
        # a missing CA file read as "unreachable: No such file or directory"
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"kafka.ssl_cafile: cannot load the CA bundle {k.ssl_cafile}: {reason}"
        ) from None
    context.check_hostname = k.ssl_check_hostname
    if k.ssl_certfile is not None and k.ssl_keyfile is not None:
        secret = settings.ssl_key_password()
        password = secret.get_secret_value() if secret is not None else None
        try:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile, password=password)
        except ssl.SSLError as exc:
            detail = (
                f"the key does not open with kafka.ssl_key_password or does not match the "
                f"certificate ({exc.reason or type(exc).__name__})"
            )
            raise ClientCertificateError(
                f"client certificate: cannot load kafka.ssl_certfile {k.ssl_certfile} / "
                f"kafka.ssl_keyfile {k.ssl_keyfile}: {detail}"
            ) from None
        except OSError as exc:
            detail = exc.strerror or type(exc).__name__
            raise ClientCertificateError(
                f"client certificate: cannot load kafka.ssl_certfile {k.ssl_certfile} / "
                f"kafka.ssl_keyfile {k.ssl_keyfile}: {detail}"
            ) from None
    return context


def client_kwargs(settings: ConnectorSettings) -> dict[str, Any]:
    """bootstrap, client id and security (SSL/SASL) for aiokafka clients."""
    k = settings.kafka
    kwargs: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(settings)
    if k.sasl_mechanism == "OAUTHBEARER":
        oauth.install_error_exchange()
        kwargs["sasl_mechanism"] = k.sasl_mechanism
        kwargs["sasl_oauth_token_provider"] = oauth.token_provider(settings)
    elif k.sasl_mechanism:
        password = settings.sasl_password()
        kwargs["sasl_mechanism"] = k.sasl_mechanism
        kwargs["sasl_plain_username"] = k.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs


def describe_failure(exc: BaseException) -> str | None:
    """One line naming the kind of failure, or None if ``exc`` is not a known Kafka,
    network or TLS failure. Never includes a secret (exception texts of these kinds do not
    carry the SASL password or the key password)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = describe_failure(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, ClientCertificateError):
        return str(exc)
    if isinstance(exc, ConfigError):  # a mounted secret unreadable, or a topic check
        text = str(exc)
        return f"credentials: {text}" if text.startswith("kafka.s") else f"topics: {text}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).lower().replace("_", " ")
        if "certificate required" in reason:
            reason += " (the broker requires a client certificate)"
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, SaslAuthenticationFailed) and str(
        exc.args[0] if exc.args else ""
    ).startswith("{"):  # RFC 7628's error status: the OAUTHBEARER token refused (connector.oauth)
        return f"authentication failed: the broker refused the OAuth token ({exc.args[0]})"
    if isinstance(exc, SaslAuthenticationFailed | IllegalSaslStateError):
        return "authentication failed: the broker refused the SASL user name or password"
    if isinstance(exc, UnsupportedSaslMechanismError):
        return "authentication failed: the broker does not offer kafka.sasl_mechanism"
    if isinstance(exc, _AUTHORIZATION):
        return f"not authorized: {type(exc).__name__} ({exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(exc, OSError) and exc.errno is not None and "Name or service" in str(exc):
        return "unreachable: the host name does not resolve"
    if isinstance(exc, ConnectionError):
        return f"unreachable: the connection was closed ({type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return "unreachable: no answer in time"
    if isinstance(exc, OSError):
        return f"unreachable: {exc.strerror or exc}"
    if isinstance(exc, KafkaConnectionError):
        text = str(exc)
        reason = str(exc.args[0]) if exc.args else ""
        if reason.startswith(oauth.UNAVAILABLE_PREFIX):
            return reason
        if "closed" in text:  # a peer dropping us mid-handshake: mTLS refusal or a bad SASL
            return f"connection closed by the broker during set-up ({text})"
        return f"unreachable: {text}"
    if isinstance(exc, KafkaError):
        return f"Kafka error: {type(exc).__name__} ({exc})"
    return None


async def diagnose(settings: ConnectorSettings, timeout_s: float = 10.0) -> str | None:
    """Open one connection to the bootstrap servers (TLS, SASL included) and describe the
    first failure; None if one connects."""
    try:
        kwargs = client_kwargs(settings)
    except ConfigError as exc:
        return describe_failure(exc)
    first: str | None = None
    for hostport in settings.kafka.bootstrap_servers.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(
                    host.strip("[]"),
                    int(port),
                    client_id=kwargs["client_id"],
                    request_timeout_ms=kwargs["request_timeout_ms"],
                    ssl_context=kwargs.get("ssl_context"),
                    security_protocol=kwargs["security_protocol"],
                    sasl_mechanism=kwargs.get("sasl_mechanism"),
                    sasl_plain_username=kwargs.get("sasl_plain_username"),
                    sasl_plain_password=kwargs.get("sasl_plain_password"),
                    sasl_oauth_token_provider=kwargs.get("sasl_oauth_token_provider"),
                )
        except (OSError, KafkaError, TimeoutError, ValueError) as exc:
            first = first or _explain(settings, exc)
            continue
        conn.close()
        return None
    return first


def _explain(settings: ConnectorSettings, exc: BaseException) -> str:
    k = settings.kafka
    if (
        isinstance(exc, KafkaConnectionError)
        and "closed" in str(exc)
        and "SSL" in (k.security_protocol)
    ):
        # TLS 1.3: a broker refusing our certificate (or its absence) just hangs up
        if k.ssl_certfile is None:
            return (
                "TLS handshake refused: the broker closed the connection; it probably "
                "requires a client certificate (kafka.ssl_certfile is not set)"
            )
        return (
            "TLS handshake refused: the broker closed the connection; it probably does not "
            f"trust the client certificate {k.ssl_certfile}"
        )
    return describe_failure(exc) or f"{type(exc).__name__}: {exc}"


def needs_diagnosis(exc: BaseException) -> bool:
    """aiokafka's bootstrap failure hides the cause: only a connection of our own finds it."""
    if isinstance(exc, BaseExceptionGroup):
        return any(needs_diagnosis(inner) for inner in exc.exceptions)
    return isinstance(exc, KafkaConnectionError)


class BootstrapNoise(logging.Filter):
    """For aiokafka's client logger (named ``aiokafka``): drops its per-host bootstrap
    error ('Unable connect to "host:port"'): the connector reports each failed attempt
    itself, in one line with the cause classified."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(
            ('Unable connect to "', "Unable to request metadata from")
        )


class OutageNoise(logging.Filter):
    """For aiokafka's client logger: while a broker is gone, its producer logs every
    reconnect and metadata attempt (one pair every ``kafka.producer_retry_backoff_ms``:
    1,455 lines in 10 s at 20 ms). One line of each kind per ``every_s`` gets through,
    with the number left out since; readiness names the outage (the reachability
    probe)."""

    PREFIXES = ("Unable connect to node with id", "Unable to update metadata from")

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock or time.monotonic
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if not template.startswith(self.PREFIXES):
            return True
        now = self._clock()
        last = self._last.get(template)
        if last is not None and now - last < self._every_s:
            self._left_out[template] = self._left_out.get(template, 0) + 1
            return False
        self._last[template] = now
        left_out = self._left_out.pop(template, 0)
        if left_out and isinstance(record.args, tuple):
            record.msg = f"{template} (%d more like it in the last %gs)"
            record.args = (*record.args, left_out, self._every_s)
        return True
