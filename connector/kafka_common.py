"""Connection settings shared by every Kafka client the connector opens."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from connector.config import ConnectorSettings


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
        kwargs["ssl_context"] = create_ssl_context(
            cafile=str(k.ssl_cafile) if k.ssl_cafile else None
        )
    if k.sasl_mechanism:
        password = settings.sasl_password()
        kwargs["sasl_mechanism"] = k.sasl_mechanism
        kwargs["sasl_plain_username"] = k.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs
