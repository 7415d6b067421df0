"""connector.threads_client: one attempt, every OpenAPI status mapped, via MockTransport."""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
from pydantic import SecretStr

from connector.errors import ApiError, AuthError, PermanentApiError, RetriableApiError
from connector.routing import ThreadRequest
from connector.threads_client import ApiThread, ThreadsClient, parse_retry_after

BASE_URL = "https://api.test"
IDENTIFIERS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")
REQUEST = ThreadRequest(
    app_uid="demo app/1",
    agent_uid="agent-orders::s-1",
    message="Order o-1 has shipped.",
    message_type="system",
    identifier_field="externalUserId",
    identifier_value="cust-42",
)
Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, key: Callable[[], SecretStr] | None = None) -> ThreadsClient:
    return ThreadsClient(
        BASE_URL,
        key or (lambda: SecretStr("the-api-key")),
        connect_timeout_s=1.0,
        request_timeout_s=2.0,
        max_in_flight=4,
        transport=httpx.MockTransport(handler),
    )


async def call(handler: Handler, event_id: str = "evt-1") -> ApiThread:
    async with client(handler) as c:
        return await c.create_thread(REQUEST, event_id=event_id, correlation_id="corr-1")


def respond(
    status: int,
    *,
    json: object = None,
    content: bytes | None = None,
    text: str | None = None,
    headers: dict[str, str] | None = None,
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=json, content=content, text=text, headers=headers)

    return handler


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


async def api_error(handler: Handler) -> ApiError:
    with pytest.raises(ApiError) as info:
        await call(handler)
    return info.value


# -- the request ---------------------------------------------------------------------------


async def test_request_shape() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"threadUid": "th-1"})

    await call(handler, event_id="evt-9")

    (request,) = seen
    assert request.method == "POST"
    assert request.url.host == "api.test"
    assert request.url.raw_path == b"/api/v1/appuid/demo%20app%2F1/threads"
    assert request.headers["x-api-key"] == "the-api-key"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-event-id"] == "evt-9"
    assert request.headers["x-correlation-id"] == "corr-1"
    body = orjson.loads(request.content)
    assert body == {
        "agentUid": "agent-orders::s-1",
        "message": "Order o-1 has shipped.",
        "messageType": "system",
        "externalUserId": "cust-42",
    }
    assert [name for name in IDENTIFIERS if name in body] == ["externalUserId"]


async def test_api_key_is_read_for_every_call() -> None:
    keys = iter(["key-1", "key-2"])
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["x-api-key"])
        return httpx.Response(201, json={"threadUid": "th"})

    async with client(handler, key=lambda: SecretStr(next(keys))) as c:
        await c.create_thread(REQUEST, event_id="e", correlation_id="c")
        await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert sent == ["key-1", "key-2"]


# -- statuses ------------------------------------------------------------------------------


async def test_201_returns_the_thread() -> None:
    body = {"threadUid": "th-1", "humanUid": "hu-1", "agentUid": "agent-orders"}
    assert await call(respond(201, json=body)) == ApiThread("th-1", "hu-1", "agent-orders")


async def test_201_with_only_a_thread_uid() -> None:
    assert await call(respond(201, json={"threadUid": "th-1"})) == ApiThread("th-1", "", "")


@pytest.mark.parametrize("content", [b"not json", b"{}", b"[]"])
async def test_201_without_a_thread_uid_is_permanent(content: bytes) -> None:
    exc = await api_error(respond(201, content=content))
    assert type(exc) is PermanentApiError
    assert exc.status == 201


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_permanent_statuses(status: int) -> None:
    exc = await api_error(respond(status, text="user not permitted"))
    assert type(exc) is PermanentApiError
    assert exc.status == status
    assert str(status) in str(exc)


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_statuses(status: int) -> None:
    exc = await api_error(respond(status))
    assert type(exc) is AuthError
    assert exc.status == status


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_retriable_statuses(status: int) -> None:
    exc = await api_error(respond(status))
    assert isinstance(exc, RetriableApiError)
    assert exc.status == status
    assert exc.retry_after_s is None
    assert exc.outcome_unknown is False


async def test_429_with_retry_after_seconds() -> None:
    exc = await api_error(respond(429, headers={"Retry-After": "7"}))
    assert isinstance(exc, RetriableApiError)
    assert exc.status == 429
    assert exc.retry_after_s == 7.0


async def test_503_with_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    exc = await api_error(respond(503, headers={"Retry-After": when}))
    assert isinstance(exc, RetriableApiError)
    assert exc.retry_after_s is not None
    assert 110 <= exc.retry_after_s <= 121


@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5"])
async def test_429_with_an_unusable_retry_after(value: str) -> None:
    exc = await api_error(respond(429, headers={"Retry-After": value}))
    assert isinstance(exc, RetriableApiError)
    assert exc.retry_after_s is None


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    future = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(future, now=now) == pytest.approx(90.0)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("next tuesday") is None


# -- transport errors ----------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout])
async def test_connection_failures_are_retriable_and_known_not_to_have_landed(
    exc_type: type[httpx.TransportError],
) -> None:
    exc = await api_error(raising(exc_type))
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is False
    assert exc.status is None
    assert isinstance(exc.__cause__, exc_type)


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError],
)
async def test_failures_after_sending_have_an_unknown_outcome(
    exc_type: type[httpx.TransportError],
) -> None:
    exc = await api_error(raising(exc_type))
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True
    assert isinstance(exc.__cause__, exc_type)


async def test_non_ascii_event_id_does_not_escape_as_a_foreign_error() -> None:
    with contextlib.suppress(ApiError):  # a connector error is acceptable; a foreign one is not
        await call(respond(201, json={"threadUid": "th"}), event_id="commande-été-1")


async def test_local_protocol_error_is_translated() -> None:
    await api_error(raising(httpx.LocalProtocolError))


async def test_error_body_free_text_never_reaches_the_error() -> None:
    """A 422 that echoes the request (the system message) must not carry it onward."""
    secret_text = "INVISIBLE SYSTEM PROMPT 42"
    body = {
        "error": "Validation error",
        "detail": [{"field": "message", "message": secret_text}],
        "echo": secret_text,
    }
    exc = await api_error(lambda request: httpx.Response(422, content=orjson.dumps(body)))
    assert isinstance(exc, PermanentApiError)
    assert secret_text not in str(exc)
    assert "Validation error" in str(exc) and "message" in str(exc)
    plain = await api_error(lambda request: httpx.Response(400, text=f"bad: {secret_text}"))
    assert secret_text not in str(plain)
