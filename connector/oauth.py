"""Kafka login with SASL/OAUTHBEARER: OAuth 2.0 client-credentials tokens for aiokafka.

``ClientCredentials`` is aiokafka's token provider (``sasl_oauth_token_provider``). It asks
the identity provider's token endpoint for an access token (RFC 6749 §4.4: ``grant_type=
client_credentials``, the client id and secret in HTTP Basic auth, the scope if set), keeps
it, and asks for a new one once the token is within ``kafka.oauth_refresh_margin_s`` of its
expiry (at most half its lifetime before it), so every connection aiokafka opens (each
reconnect included) presents a token that is not about to expire. The secret file is read
at each request: a rotated secret is used from the next token on.

What goes wrong, and how it shows::

    KafkaConnectionError("OAuth token: ...")   (aiokafka retries the connection)
        the endpoint unreachable, too slow, refusing the credentials (400/401 with the
        RFC 6749 error code), or answering without an access token
    SaslAuthenticationFailed (aiokafka's)
        the broker refused the token (expired, wrong audience, unsigned...): its RFC 7628
        error status ({"status":"invalid_token"})

aiokafka (0.14) does not finish the RFC 7628 exchange: when the broker answers the token
with an error challenge, aiokafka's authenticator ignores it and goes on as if logged in;
the broker then drops the connection at the first request, and the client reports an empty
cluster (``AttributeError: 'NoneType' object has no attribute 'nodeId'`` from the admin
client, ``UnknownTopicOrPartitionError`` after a request timeout from the producer).
``install_error_exchange`` puts in an authenticator that answers the error challenge the
way RFC 7628 §3.2.3 says (a single ``%x01``), so the broker fails the authentication with
its error and aiokafka raises ``SaslAuthenticationFailed`` like a refused SCRAM password.

This module is the HTTP client of the token endpoint (aiohttp, as ``threads_client`` is the
API's): a token is asked for once per lifetime, so each request opens its own session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from connector.config import ConnectorSettings, KafkaSettings
from connector.errors import ConfigError

log = logging.getLogger(__name__)
Clock = Callable[[], float]
_DETAIL_MAX = 200  # characters of an identity provider's error_description kept


UNAVAILABLE_PREFIX = "OAuth token: "


def token_unavailable(reason: str) -> KafkaConnectionError:
    """No token could be had: a connection error to aiokafka (retried, never a crash),
    its message starting with ``UNAVAILABLE_PREFIX`` (how ``kafka_common`` recognises it)
    and saying why, never with the secret."""
    return KafkaConnectionError(UNAVAILABLE_PREFIX + reason)


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # on the provider's clock
    lifetime_s: float


class ClientCredentials:
    """aiokafka's token provider (registered as a virtual ``AbstractTokenProvider``)."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: Callable[[], SecretStr],
        *,
        scope: str | None = None,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 10.0,
        ca_file: Path | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope
        self._margin_s = refresh_margin_s
        self._timeout_s = timeout_s
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._clock = clock
        self._token: _Token | None = None
        self._asking: asyncio.Future[_Token] | None = None  # the request under way
        self.requests = 0  # token requests made (tests, logs)

    async def token(self) -> str:
        """A token with more than the refresh margin left; a new one when not.

        Connections opened together share one request, its token or its failure: with
        an endpoint that does not answer, each of them fails after one timeout, not one
        per connection queued before it. Shielded: a connection given up (aiokafka's
        timeout) does not cancel the others' request."""
        current = self._token
        if current is not None and self._clock() < current.refresh_at:
            return current.value
        asking = self._asking
        if asking is None:
            asking = self._asking = asyncio.ensure_future(self._fetch_and_keep())
            asking.add_done_callback(self._asked)
        return (await asyncio.shield(asking)).value

    async def _fetch_and_keep(self) -> _Token:
        token = self._token = await self._fetch()
        return token

    def _asked(self, done: asyncio.Future[_Token]) -> None:
        if self._asking is done:
            self._asking = None
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have given up

    def forget(self) -> None:
        """Drop the token (the broker refused it): the next ``token()`` asks for another."""
        self._token = None

    async def _fetch(self) -> _Token:
        self.requests += 1
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        try:
            secret = self._secret().get_secret_value()
        except ConfigError as exc:  # the mounted file unreadable: retried like the endpoint
            raise token_unavailable(str(exc)) from None
        headers = {"authorization": aiohttp.encode_basic_auth(self._client_id, secret)}
        started = self._clock()
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                aiohttp.ClientSession() as http,
                http.post(
                    self._url,
                    data=form,
                    headers=headers,
                    ssl=self._ssl if self._url.startswith("https:") else True,
                    allow_redirects=False,
                ) as response,
            ):
                status = response.status
                body = await response.content.read(64 * 1024)
        except TimeoutError:
            raise token_unavailable(
                f"the endpoint {self._url} did not answer within {self._timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise token_unavailable(
                f"the endpoint {self._url} is unreachable: {type(exc).__name__} ({exc})"
            ) from None
        data = _json_object(body)
        if status != 200:
            raise token_unavailable(
                f"the endpoint {self._url} refused client {self._client_id!r}: "
                f"HTTP {status}{_oauth_error(data)}"
            )
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise token_unavailable(f"the endpoint {self._url} answered without an access_token")
        lifetime = _lifetime_s(data.get("expires_in"))
        margin = min(self._margin_s, lifetime / 2)
        log.info(
            "OAuth token for Kafka from %s (client %s), valid %gs, replaced in %gs",
            self._url, self._client_id, lifetime, lifetime - margin,
        )  # fmt: skip
        return _Token(token, started + lifetime - margin, float(lifetime))


AbstractTokenProvider.register(ClientCredentials)


def _lifetime_s(expires_in: Any) -> float:
    """RFC 6749's ``expires_in`` (seconds): a number, or a string of digits as Azure AD's
    v1 endpoint sends it; 0 when absent or unusable (a new token for every connection)."""
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in.strip())
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
        return 0.0
    return float(expires_in) if 0 < expires_in < float("inf") else 0.0


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _oauth_error(data: dict[str, Any]) -> str:
    """RFC 6749 §5.2's ``error`` code and ``error_description``: the identity provider's
    words (they name the problem, never the secret), bounded."""
    code, text = data.get("error"), data.get("error_description")
    parts = [p[:_DETAIL_MAX] for p in (code, text) if isinstance(p, str) and p]
    return f" ({': '.join(parts)})" if parts else ""


_providers: dict[int, tuple[KafkaSettings, ClientCredentials]] = {}


def token_provider(settings: ConnectorSettings) -> ClientCredentials:
    """The provider of ``kafka.oauth_*``, one per settings object: every client, session
    and probe of the process shares its token."""
    k = settings.kafka
    known = _providers.get(id(k))
    if known is not None and known[0] is k:
        return known[1]
    if k.oauth_token_url is None or k.oauth_client_id is None:  # validated in config
        raise ConfigError("kafka.oauth_token_url and kafka.oauth_client_id are required")
    provider = ClientCredentials(
        k.oauth_token_url,
        k.oauth_client_id,
        settings.oauth_client_secret,
        scope=k.oauth_scope,
        refresh_margin_s=k.oauth_refresh_margin_s,
        timeout_s=k.oauth_timeout_s,
        ca_file=k.oauth_ca_file,
    )
    _providers[id(k)] = (k, provider)
    return provider


class _ErrorExchangeAuthenticator:
    """aiokafka's OAUTHBEARER client steps, with RFC 7628's error exchange finished."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._sent = False

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if not self._sent:
            self._sent = True
            token = await self._provider.token()
            return f"n,,\x01auth=Bearer {token}\x01\x01".encode(), True
        if payload:  # the broker's error challenge ({"status": ...}): acknowledge it
            forget = getattr(self._provider, "forget", None)
            if forget is not None:
                forget()  # refused: the next connection asks for a new token
            return b"\x01", True
        return None


def _authenticator(connection: Any) -> _ErrorExchangeAuthenticator:
    return _ErrorExchangeAuthenticator(connection._sasl_oauth_token_provider)


def install_error_exchange() -> None:
    """Make aiokafka's connections finish a refused OAUTHBEARER login (idempotent)."""
    AIOKafkaConnection.authenticator_oauth = _authenticator
