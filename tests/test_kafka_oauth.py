"""SASL/OAUTHBEARER end to end: the connector gets client-credentials tokens from a real
token endpoint (an HTTP server in this process issuing unsecured JWTs) and logs in to a
real broker's OAUTHBEARER listener (Kafka's unsecured validator: it checks ``exp`` and
``sub``, not a signature; for tests only).

The failures an operator meets: the identity provider refusing the client (a wrong
secret), the broker refusing the token (expired), the endpoint down. Each leaves the
process up, ``/readyz`` red naming it, no traceback, and heals by itself once fixed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from connector.config import ConnectorSettings
from connector.kafka_common import describe_failure
from connector.localkafka import LocalKafka
from connector.localkafka.ports import free_ports
from connector.oauth import ClientCredentials, token_provider
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, make_settings, produce, results, wait_until_committed
from tests.test_kafka_security import (
    FAST_RETRY,
    assert_quiet,
    end_to_end,
    readiness,
    started_anyway,
    wait_ready,
)

CLIENT_ID = "threads-connector"
CLIENT_SECRET = "oauth-secret-3c2b1a-must-not-leak"
OAUTH_BROKER_CONFIG = {
    "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
    "listener.name.oauth.oauthbearer.sasl.jaas.config": (
        "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required "
        'unsecuredLoginStringClaim_sub="broker";'
    ),
    "listener.name.oauth.oauthbearer.sasl.server.callback.handler.class": (
        "org.apache.kafka.common.security.oauthbearer.internals.unsecured."
        "OAuthBearerUnsecuredValidatorCallbackHandler"
    ),
    # a connection whose token expires is closed by the broker (KIP-368; aiokafka does not
    # re-authenticate): the client must come back with a fresh token
    "listener.name.oauth.oauthbearer.connections.max.reauth.ms": "3600000",
}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def unsecured_jwt(sub: str, lifetime_s: float) -> str:
    now = int(time.time())
    return (
        f"{_b64({'alg': 'none'})}.{_b64({'sub': sub, 'iat': now, 'exp': now + int(lifetime_s)})}."
    )


class TokenEndpoint:
    """An OAuth 2.0 token endpoint (client credentials, Basic auth) issuing unsecured JWTs
    whose ``sub`` is the client id. ``lifetime_s`` is the token's real one; ``expired``
    issues tokens already expired (while ``expires_in`` still says an hour)."""

    def __init__(self) -> None:
        self.lifetime_s = 3600.0
        self.expired = False
        self.expires_in_as_text = False  # Azure AD's v1 endpoint: "expires_in": "3599"
        self.hanging = False  # requests are taken and never answered (until ``unhang``)
        self.unhang = asyncio.Event()
        self.received = 0
        self.issued = 0
        self.scopes: list[str | None] = []
        self.url = ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.received += 1
        if self.hanging:
            await self.unhang.wait()
        form = await request.post()
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            body = {"error": "invalid_client", "error_description": "client authentication failed"}
            return web.json_response(body, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self.issued += 1
        scope = form.get("scope")
        self.scopes.append(scope if isinstance(scope, str) else None)
        lifetime = -60 if self.expired else self.lifetime_s
        token = unsecured_jwt(CLIENT_ID, lifetime)
        expires_in: Any = 3600 if self.expired else self.lifetime_s
        if self.expires_in_as_text:
            expires_in = str(int(expires_in))
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
        )


@pytest.fixture(scope="module")
def oauth_kafka() -> Iterator[LocalKafka]:
    kafka = LocalKafka(listeners={"OAUTH": "SASL_PLAINTEXT"}, broker_config=OAUTH_BROKER_CONFIG)
    with kafka:
        yield kafka


@pytest.fixture
async def idp() -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    server = RawTestServer(endpoint.handle)
    await server.start_server()
    endpoint.url = str(server.make_url("/oauth2/token"))
    try:
        yield endpoint
    finally:
        await server.close()


@pytest.fixture
async def sim() -> AsyncIterator[ThreadsApiSimulator]:
    async with ThreadsApiSimulator(SimulatorSettings(seed=7)) as simulator:
        yield simulator


def secret_file(tmp_path: Path, value: str = CLIENT_SECRET) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(value + "\n", encoding="utf-8")
    return path


def oauth(kafka: LocalKafka, idp: TokenEndpoint, secret: Path, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap_servers": kafka.listener_address("OAUTH"),
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "OAUTHBEARER",
        "oauth_token_url": idp.url,
        "oauth_client_id": CLIENT_ID,
        "oauth_client_secret_file": str(secret),
        "oauth_scope": "kafka.produce kafka.consume",
        **FAST_RETRY,
        **extra,
    }


def settings_for(
    kafka: LocalKafka, base_url: str, names: Names, **oauth_kw: Any
) -> ConnectorSettings:
    return make_settings(kafka.bootstrap_servers, base_url, names, kafka=oauth_kw)


async def test_oauthbearer_end_to_end_with_one_token_shared(
    oauth_kafka: LocalKafka, idp: TokenEndpoint, sim: ThreadsApiSimulator, tmp_path: Path
) -> None:
    names = Names.fresh("oauth")
    settings = settings_for(oauth_kafka, sim.base_url, names,
                            **oauth(oauth_kafka, idp, secret_file(tmp_path)))  # fmt: skip
    await end_to_end(oauth_kafka.bootstrap_servers, settings, names)
    # every client, session and probe of the process shares the token: one request
    assert idp.issued == 1
    assert idp.scopes == ["kafka.produce kafka.consume"]


async def test_a_token_refused_by_the_broker_is_a_readiness_reason_not_a_crash(
    oauth_kafka: LocalKafka,
    idp: TokenEndpoint,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An expired token: the broker's RFC 7628 error reaches /readyz (aiokafka alone
    reported an empty cluster, and the admin client's AttributeError ended the run)."""
    caplog.set_level(logging.INFO)
    idp.expired = True
    names = Names.fresh("oauthexp")
    settings = settings_for(oauth_kafka, sim.base_url, names,
                            **oauth(oauth_kafka, idp, secret_file(tmp_path)))  # fmt: skip
    async with started_anyway(settings) as connector:
        detail = await wait_ready(connector, 503, "kafka: ")
        while connector.kafka_attempts < 2:
            await asyncio.sleep(0.1)
        status, detail = await readiness(connector)
        assert status == 503
        assert "the broker refused the OAuth token" in detail, detail
        assert "invalid_token" in detail, detail
        # a refused token is not offered again: fixed at the identity provider, the next
        # attempt's token is good and the connector recovers by itself
        issued = idp.issued
        assert issued >= 2
        idp.expired = False
        await wait_ready(connector, 200)
        plain = oauth_kafka.bootstrap_servers
        await produce(plain, names.input, [(b"u-1", event("after-refresh"))])
        await wait_until_committed(plain, names.group, names.input)
    assert [r["eventId"] for r in await results(plain, names.results)] == ["after-refresh"]
    assert_quiet(caplog, CLIENT_SECRET)


async def test_a_client_refused_by_the_identity_provider_then_fixed(
    oauth_kafka: LocalKafka,
    idp: TokenEndpoint,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong client secret: /readyz names the endpoint and its RFC 6749 error; the
    secret file rotated, the next attempt gets a token (no restart)."""
    caplog.set_level(logging.INFO)
    names = Names.fresh("oauthpw")
    wrong = "wrong-secret-9f8e-must-not-leak"
    secret = secret_file(tmp_path, wrong)
    settings = settings_for(oauth_kafka, sim.base_url, names, **oauth(oauth_kafka, idp, secret))
    async with started_anyway(settings) as connector:
        detail = await wait_ready(connector, 503, "OAuth token")
        assert f"refused client '{CLIENT_ID}': HTTP 401 (invalid_client" in detail, detail
        assert idp.url in detail
        secret.write_text(CLIENT_SECRET, encoding="utf-8")
        await wait_ready(connector, 200)
        plain = oauth_kafka.bootstrap_servers
        await produce(plain, names.input, [(b"u-1", event("after-fix"))])
        await wait_until_committed(plain, names.group, names.input)
    assert [r["eventId"] for r in await results(plain, names.results)] == ["after-fix"]
    assert_quiet(caplog, CLIENT_SECRET, wrong)


async def test_an_unreachable_token_endpoint_is_a_readiness_reason(
    oauth_kafka: LocalKafka, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    names = Names.fresh("oauthdown")
    (port,) = free_ports(1)
    down = TokenEndpoint()
    down.url = f"http://127.0.0.1:{port}/token"
    settings = settings_for(oauth_kafka, "http://127.0.0.1:9", names,
                            **oauth(oauth_kafka, down, secret_file(tmp_path)))  # fmt: skip
    async with started_anyway(settings) as connector:
        detail = await wait_ready(connector, 503, "OAuth token")
        assert f"the endpoint {down.url} is unreachable" in detail, detail
        assert detail.startswith("kafka: ")
    assert_quiet(caplog, CLIENT_SECRET)


async def test_tokens_are_replaced_before_they_expire_and_the_broker_never_sees_one_expired(
    oauth_kafka: LocalKafka,
    idp: TokenEndpoint,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tokens of 8 s, replaced 4 s before expiry. The broker closes a connection whose
    token expired (connections.max.reauth.ms), so over 20 s of traffic every connection
    aiokafka reopens must present a fresh token: events keep flowing, readiness stays
    green and no authentication ever fails."""
    caplog.set_level(logging.INFO)
    idp.lifetime_s = 8
    names = Names.fresh("oauthref")
    kafka = oauth(oauth_kafka, idp, secret_file(tmp_path), oauth_refresh_margin_s=4)
    settings = settings_for(oauth_kafka, sim.base_url, names, **kafka)
    plain = oauth_kafka.bootstrap_servers
    sent: list[str] = []
    async with started_anyway(settings) as connector:
        await wait_ready(connector, 200)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = [f"r-{len(sent) + i}" for i in range(5)]
            await produce(plain, names.input, [(b"u-1", event(e)) for e in batch])
            sent += batch
            status, detail = await readiness(connector)
            assert status == 200, detail
            await asyncio.sleep(1.0)
        await wait_until_committed(plain, names.group, names.input, timeout_s=60)
    assert sorted(r["eventId"] for r in await results(plain, names.results)) == sorted(sent)
    assert idp.issued >= 3  # 20 s of 8 s tokens renewed at 4 s
    # no connection was ever refused for an expired token (aiokafka logs its reconnects)
    assert "invalid_token" not in caplog.text and "SaslAuthenticationFailed" not in caplog.text
    assert_quiet(caplog, CLIENT_SECRET)


# -- the provider alone ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def serving(endpoint: TokenEndpoint) -> AsyncIterator[str]:
    server = RawTestServer(endpoint.handle)
    await server.start_server()
    try:
        yield str(server.make_url("/token"))
    finally:
        await server.close()


async def test_the_provider_reuses_a_token_until_the_margin_before_its_expiry() -> None:
    endpoint = TokenEndpoint()
    endpoint.lifetime_s = 300
    clock = FakeClock()
    async with serving(endpoint) as url:
        secret = SecretStr(CLIENT_SECRET)
        provider = ClientCredentials(
            url, CLIENT_ID, lambda: secret, refresh_margin_s=60, clock=clock
        )
        first = await provider.token()
        assert await asyncio.gather(*(provider.token() for _ in range(5))) == [first] * 5
        assert endpoint.issued == 1
        clock.now += 239  # 1 s before the margin
        assert await provider.token() == first
        clock.now += 1
        await provider.token()
        assert endpoint.issued == 2
        # a short-lived token is replaced at half its lifetime at the latest
        endpoint.lifetime_s = 20
        clock.now += 1000
        await provider.token()
        clock.now += 9
        await provider.token()
        assert endpoint.issued == 3
        clock.now += 1
        await provider.token()
        assert endpoint.issued == 4


async def test_an_expires_in_sent_as_text_is_read_as_the_lifetime() -> None:
    """Azure AD's v1 token endpoint (Event Hubs' Kafka with OAuth) and some older identity
    providers send ``"expires_in": "3599"``, a string. It was read as no lifetime: a new
    token for every connection aiokafka opened, and an INFO line each ("valid 0s")."""
    endpoint = TokenEndpoint()
    endpoint.lifetime_s = 300
    endpoint.expires_in_as_text = True
    clock = FakeClock()
    async with serving(endpoint) as url:
        secret = SecretStr(CLIENT_SECRET)
        provider = ClientCredentials(
            url, CLIENT_ID, lambda: secret, refresh_margin_s=60, clock=clock
        )
        first = await provider.token()
        for _ in range(3):
            assert await provider.token() == first
        assert endpoint.issued == 1
        clock.now += 240  # the margin before its expiry
        await provider.token()
        assert endpoint.issued == 2


async def test_connections_waiting_for_a_hanging_endpoint_share_one_request() -> None:
    """An identity provider that takes the request and never answers: every Kafka
    connection opening meanwhile (consumer, producers, admin, one per broker) queued
    behind the one asking, then asked again itself, each for the whole timeout: the fifth
    failed after 5 x oauth_timeout_s (50 s with the default), with 5 hanging requests.
    Those waiting share the request under way, its token or its failure."""
    endpoint = TokenEndpoint()
    endpoint.hanging = True
    async with serving(endpoint) as url:
        secret = SecretStr(CLIENT_SECRET)
        provider = ClientCredentials(url, CLIENT_ID, lambda: secret, timeout_s=0.5)
        started = time.monotonic()
        failures = await asyncio.gather(
            *(provider.token() for _ in range(5)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(f, KafkaConnectionError) for f in failures), failures
        assert all("did not answer within 0.5s" in str(f) for f in failures)
        assert endpoint.received == 1
        assert elapsed < 2.0, elapsed
        endpoint.hanging = False
        endpoint.unhang.set()
        assert await provider.token()  # the next connection asks again, and gets one
        assert endpoint.received == 2


async def test_an_unreadable_secret_file_is_a_token_problem_retried_not_a_crash(
    tmp_path: Path,
) -> None:
    """Raised inside aiokafka's connection set-up, anything but a connection error would
    escape its retries."""
    settings = make_settings(
        "127.0.0.1:1", "http://127.0.0.1:9", Names.fresh("oauthfile"),
        kafka=oauth_kafka_settings(tmp_path / "missing"),
    )  # fmt: skip
    provider = token_provider(settings)
    assert token_provider(settings) is provider  # one per settings: the token is shared
    with pytest.raises(KafkaConnectionError) as info:
        await provider.token()
    assert str(info.value.args[0]).startswith(
        "OAuth token: kafka.oauth_client_secret_file: cannot read"
    )
    assert describe_failure(info.value) == info.value.args[0]


def oauth_kafka_settings(secret: Path) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "OAUTHBEARER",
        "oauth_token_url": "http://127.0.0.1:9/token",
        "oauth_client_id": CLIENT_ID,
        "oauth_client_secret_file": str(secret),
    }
