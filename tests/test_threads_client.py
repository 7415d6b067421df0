"""connector.threads_client: one attempt against a real HTTP server in this process.

Every OpenAPI status mapped; every transport failure (refused, reset, trickling body,
slow headers, oversized body, untrusted TLS) translated into the connector's tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from multidict import CIMultiDict
from pydantic import SecretStr

from connector.errors import ApiError, AuthError, PermanentApiError, RetriableApiError
from connector.localkafka.ports import free_ports
from connector.routing import ThreadRequest
from connector.threads_client import ApiThread, ThreadsClient, parse_retry_after

IDENTIFIERS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")
REQUEST = ThreadRequest(
    app_uid="demo app/1",
    agent_uid="agent-orders::s-1",
    message="Order o-1 has shipped.",
    message_type="system",
    identifier_field="externalUserId",
    identifier_value="cust-42",
)
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A real HTTP server in this loop answering with ``handler``; yields its base URL."""
    server = RawTestServer(handler)
    await server.start_server(ssl=ssl_context)
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def client(
    base_url: str,
    key: Callable[[], SecretStr] | None = None,
    *,
    request_timeout_s: float = 2.0,
    max_response_bytes: int = 1 << 20,
    ca_file: Path | None = None,
) -> ThreadsClient:
    return ThreadsClient(
        base_url,
        key or (lambda: SecretStr("the-api-key")),
        connect_timeout_s=1.0,
        request_timeout_s=request_timeout_s,
        max_in_flight=4,
        max_response_bytes=max_response_bytes,
        ca_file=ca_file,
    )


async def call(handler: Handler, event_id: str = "evt-1", **options: object) -> ApiThread:
    async with serving(handler) as base_url, client(base_url, **options) as c:  # type: ignore[arg-type]
        return await c.create_thread(REQUEST, event_id=event_id, correlation_id="corr-1")


def respond(
    status: int,
    *,
    json: object = None,
    content: bytes | None = None,
    text: str | None = None,
    headers: dict[str, str] | None = None,
) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        body = orjson.dumps(json) if json is not None else content
        return web.Response(status=status, body=body, text=text, headers=headers)

    return handler


async def api_error(handler: Handler, **options: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        await call(handler, **options)
    return info.value


# -- the request ---------------------------------------------------------------------------


async def test_request_shape() -> None:
    seen: list[tuple[str, str, CIMultiDict[str], bytes]] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(
            (request.method, request.raw_path, CIMultiDict(request.headers), await request.read())
        )
        return web.Response(status=201, body=orjson.dumps({"threadUid": "th-1"}))

    await call(handler, event_id="evt-9")

    ((method, raw_path, headers, content),) = seen
    assert method == "POST"
    assert raw_path == "/api/v1/appuid/demo%20app%2F1/threads"
    assert headers["x-api-key"] == "the-api-key"
    assert headers["Content-Type"] == "application/json"
    assert headers["x-event-id"] == "evt-9"
    assert headers["x-correlation-id"] == "corr-1"
    body = orjson.loads(content)
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

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        sent.append(request.headers["x-api-key"])
        return web.Response(status=201, body=orjson.dumps({"threadUid": "th"}))

    async with (
        serving(handler) as base_url,
        client(base_url, key=lambda: SecretStr(next(keys))) as c,
    ):
        await c.create_thread(REQUEST, event_id="e", correlation_id="c")
        await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert sent == ["key-1", "key-2"]


# -- statuses ------------------------------------------------------------------------------


async def test_201_returns_the_thread() -> None:
    body = {"threadUid": "th-1", "humanUid": "hu-1", "agentUid": "agent-orders"}
    assert await call(respond(201, json=body)) == ApiThread("th-1", "hu-1", "agent-orders")


async def test_201_with_only_a_thread_uid() -> None:
    assert await call(respond(201, json={"threadUid": "th-1"})) == ApiThread("th-1", "", "")


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{}",
        b"[]",
        # the spec says a string: anything else must not be published as "None" or "12"
        b'{"threadUid": null}',
        b'{"threadUid": 12}',
        b'{"threadUid": ""}',
        b'{"threadUid": {"a": 1}}',
    ],
)
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


# "\u00b2" (superscript two) is str.isdigit() but not a number float() takes
@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5", "\u00b2", "1\u00b2"])
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
    assert parse_retry_after("\u00b2") is None


# -- transport errors ----------------------------------------------------------------------


async def test_connection_refused_is_retriable_and_known_not_to_have_landed() -> None:
    (port,) = free_ports(1)
    async with client(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(RetriableApiError) as info:
            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    exc = info.value
    assert exc.outcome_unknown is False
    assert exc.status is None
    assert exc.kind == "connect_error"
    assert exc.transport_failure
    assert isinstance(exc.__cause__, aiohttp.ClientConnectorError)


async def test_connection_reset_after_the_request_has_an_unknown_outcome() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=201)

    exc = await api_error(handler)
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True
    assert exc.kind == "protocol_error"


async def test_a_trickling_body_ends_at_the_total_deadline() -> None:
    """One byte every 0.3 s never trips a per-read timeout; the total deadline ends it."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=201)
        await response.prepare(request)
        for byte in b'{"threadUid": "th-1"}' * 100:
            await response.write(bytes([byte]))
            await asyncio.sleep(0.3)
        return response

    exc = await api_error(handler, request_timeout_s=1.0)
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True
    assert exc.kind == "timeout"


async def test_slow_headers_end_at_the_total_deadline() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(status=201)

    exc = await api_error(handler, request_timeout_s=0.5)
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_201_body_over_the_limit_is_cut_off_with_an_unknown_outcome(
    chunked: bool,
) -> None:
    body = orjson.dumps({"threadUid": "th-1", "pad": "x" * 300_000})

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        if not chunked:
            return web.Response(status=201, body=body)
        response = web.StreamResponse(status=201)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 10_000):
            await response.write(body[i : i + 10_000])
        return response

    exc = await api_error(handler, max_response_bytes=100_000)
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True
    assert exc.kind == "body_too_large"
    # under the limit the same body is a thread
    assert (await call(handler, max_response_bytes=1 << 20)).thread_uid == "th-1"


def gzipped(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9)


async def test_the_client_asks_for_an_uncompressed_body() -> None:
    seen: list[str | None] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        seen.append(request.headers.get("accept-encoding"))
        return web.json_response({"threadUid": "th-1"}, status=201)

    assert (await call(handler)).thread_uid == "th-1"
    assert seen == ["identity"]


async def test_a_gzip_body_sent_anyway_is_inflated() -> None:
    body = gzipped(orjson.dumps({"threadUid": "th-gz", "humanUid": "h-1"}))
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    thread = await call(respond(201, content=body, headers=headers))
    assert (thread.thread_uid, thread.human_uid) == ("th-gz", "h-1")


async def test_a_gzip_bomb_is_cut_at_the_limit_of_inflated_bytes() -> None:
    """100 MB of inflated JSON in a ~100 KB body: the limit counts inflated bytes, and
    inflating stops there (the whole bomb is never held)."""
    bomb = gzipped(b'{"threadUid": "th-1", "pad": "' + b"x" * 100_000_000 + b'"}')
    assert len(bomb) < 200_000
    headers = {"content-encoding": "gzip"}
    exc = await api_error(respond(201, content=bomb, headers=headers), max_response_bytes=1 << 20)
    assert isinstance(exc, RetriableApiError)
    assert exc.kind == "body_too_large" and exc.outcome_unknown is True


@pytest.mark.parametrize(
    ("encoding", "content"),
    [("br", b"\x1b\x00\x00"), ("gzip", b"not gzip at all"), ("compress", b"x")],
)
async def test_a_201_body_that_cannot_be_decoded_has_an_unknown_outcome(
    encoding: str, content: bytes
) -> None:
    headers = {"content-encoding": encoding}
    exc = await api_error(respond(201, content=content, headers=headers))
    assert isinstance(exc, RetriableApiError)
    assert exc.outcome_unknown is True


async def test_an_error_status_keeps_its_meaning_with_an_oversized_body() -> None:
    exc = await api_error(respond(422, content=b"x" * 200_000), max_response_bytes=1000)
    assert type(exc) is PermanentApiError
    assert exc.status == 422


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_not_followed_and_are_the_hosts_failure(status: int) -> None:
    """Not followed; not the event's fault either (it was dead-lettered, every event
    alike): a transport failure for the circuit breaker, known not to have landed."""
    exc = await api_error(respond(status, headers={"Location": "https://elsewhere.example/"}))
    assert type(exc) is RetriableApiError
    assert exc.status == status and exc.transport_failure and not exc.outcome_unknown


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate of a private CA, and that CA's PEM file."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, ca_file


async def test_an_untrusted_certificate_is_a_tls_failure(
    tls: tuple[ssl.SSLContext, Path],
) -> None:
    server_ctx, _ = tls
    async with (
        serving(respond(201, json={"threadUid": "th"}), server_ctx) as base_url,
        client(base_url) as c,
    ):
        with pytest.raises(RetriableApiError) as info:
            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert info.value.kind == "tls_error"
    assert info.value.transport_failure
    assert info.value.outcome_unknown is False


async def test_a_private_ca_is_trusted_through_ca_file(tls: tuple[ssl.SSLContext, Path]) -> None:
    server_ctx, ca_file = tls
    async with serving(respond(201, json={"threadUid": "th"}), server_ctx) as base_url:
        assert base_url.startswith("https://")
        async with client(base_url, ca_file=ca_file) as c:
            thread = await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert thread.thread_uid == "th"


async def test_non_ascii_event_id_does_not_escape_as_a_foreign_error() -> None:
    with contextlib.suppress(ApiError):  # a connector error is acceptable; a foreign one is not
        await call(respond(201, json={"threadUid": "th"}), event_id="commande-été-1")


@pytest.mark.parametrize("key", ["bad\nkey-SECRET", "bad-kéy-SECRET\u2603"])
async def test_a_key_that_cannot_be_a_header_is_translated_without_its_value(key: str) -> None:
    """Defence in depth (config validates the key where it is read): a foreign error here
    could carry the header value into a dead letter or a log."""
    async with (
        serving(respond(201, json={"threadUid": "th"})) as base_url,
        client(base_url, key=lambda: SecretStr(key)) as c,
    ):
        with pytest.raises(ApiError) as info:
            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert "SECRET" not in str(info.value)


async def test_error_body_free_text_never_reaches_the_error() -> None:
    """A 422 that echoes the request (the system message) must not carry it onward."""
    secret_text = "INVISIBLE SYSTEM PROMPT 42"
    body = {
        "error": "Validation error",
        "detail": [{"field": "message", "message": secret_text}],
        "echo": secret_text,
    }
    exc = await api_error(respond(422, content=orjson.dumps(body)))
    assert isinstance(exc, PermanentApiError)
    assert secret_text not in str(exc)
    assert "Validation error" in str(exc) and "message" in str(exc)
    plain = await api_error(respond(400, text=f"bad: {secret_text}"))
    assert secret_text not in str(plain)


async def test_an_error_body_echoing_the_api_key_does_not_carry_it_onward() -> None:
    """A 4xx whose error title or field names echo the x-api-key it was sent: the key
    must not reach the error (it becomes the dlq-reason header and a log line)."""
    key = "sk-live-0123456789abcdef"
    body = {
        "error": f"API key {key} is not valid for this app",
        "detail": [{"field": f"x-api-key={key}"}, {"field": "x" * 55 + key}],
    }
    for status in (400, 401, 422):
        with pytest.raises(ApiError) as info:
            await call(respond(status, content=orjson.dumps(body)), key=lambda: SecretStr(key))
        text = str(info.value)
        assert key not in text and key[:8] not in text, text
        assert "[redacted]" in text


async def test_an_error_body_with_thousands_of_fields_gives_a_bounded_error() -> None:
    """A 422 listing 10,000 fields (under the body limit): the error (a log line per dead
    letter) stays short, saying how many fields were left out."""
    detail = [{"field": f"f{i:05d}" + "y" * 50} for i in range(10_000)]
    body = {"error": "Validation error", "detail": detail}
    exc = await api_error(respond(422, content=orjson.dumps(body)))
    assert isinstance(exc, PermanentApiError)
    assert len(str(exc)) < 1000
    assert "f00000" in str(exc) and "more" in str(exc)


DEEP = "[" * 1000 + "]" * 1000  # orjson accepts up to 1,023 levels; repr() does not


async def test_a_deeply_nested_field_in_an_error_body_is_a_permanent_error() -> None:
    """``str()`` of a 1,000-deep field name raised RecursionError out of the client."""
    body = f'{{"error": "Validation error", "detail": [{{"field": {DEEP}}}, {{"field": 7}}]}}'
    exc = await api_error(respond(422, content=body.encode()))
    assert isinstance(exc, PermanentApiError)
    assert str(exc).startswith("HTTP 422: Validation error; fields: 7 (POST /")


@pytest.mark.parametrize("odd", [DEEP, '{"a": 1}', "[1]", "42", "true"])
async def test_a_201_with_odd_human_and_agent_uids_keeps_the_thread(odd: str) -> None:
    """humanUid/agentUid that are not strings: the thread is kept, the odd values are not
    published (not as a Python repr, and not by a RecursionError out of the client)."""
    body = f'{{"threadUid": "th-1", "humanUid": {odd}, "agentUid": {odd}}}'
    thread = await call(respond(201, content=body.encode()))
    assert thread == ApiThread(thread_uid="th-1", human_uid="", agent_uid="")


@pytest.mark.parametrize("status", [200, 203])
async def test_a_2xx_other_than_201_with_a_thread_uid_keeps_the_thread(status: int) -> None:
    """The spec answers 201; a 200 with the thread in its body (a gateway, a new API
    version) is a thread created too. It was dead-lettered (``http_200``): the result of a
    thread that exists was never published, and a redrive created a second one."""
    body = {"threadUid": "th-1", "humanUid": "hu-1", "agentUid": "agent-orders"}
    thread = await call(respond(status, json=body))
    assert (thread.thread_uid, thread.human_uid, thread.status) == ("th-1", "hu-1", status)


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_a_2xx_without_a_thread_uid_says_the_thread_may_exist(status: int) -> None:
    exc = await api_error(respond(status, content=b"" if status == 204 else b"{}"))
    assert isinstance(exc, PermanentApiError) and exc.status == status
    assert "may exist" in str(exc)


@pytest.mark.parametrize("prefix", ["/mindset", "/gw/mindset"])
async def test_a_base_url_with_a_path_keeps_its_path(prefix: str) -> None:
    """An API behind a gateway path (``https://gw.example/mindset``): the URL was joined
    by aiohttp's ``base_url``, which refuses a path without a trailing slash (the settings
    strip it), so every call failed as "request could not be sent" and every event was
    dead-lettered; with the slash the path was dropped. Now the path is kept."""
    paths: list[str] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        paths.append(request.raw_path)
        await request.read()
        return web.Response(status=201, body=b'{"threadUid": "th-1"}')

    async with serving(handler) as base_url, client(base_url + prefix) as c:
        thread = await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert thread.thread_uid == "th-1"
    assert paths == [f"{prefix}/api/v1/appuid/demo%20app%2F1/threads"]


@pytest.mark.parametrize("status", [408, 425])
async def test_a_request_the_server_did_not_process_is_retried(status: int) -> None:
    """408 (the server, or a gateway before it, timed the request out before processing
    it) and 425 (Too Early: refused unprocessed) say a retry is safe; they were dead
    letters the API never saw, needing a redrive."""
    exc = await api_error(respond(status, headers={"retry-after": "2"}))
    assert isinstance(exc, RetriableApiError)
    assert (exc.status, exc.retry_after_s, exc.outcome_unknown) == (status, 2.0, False)
    assert not exc.transport_failure  # an answer: the API is up, no circuit breaker


async def test_a_201_body_with_a_byte_order_mark_keeps_the_thread() -> None:
    """RFC 8259 §8.1: a parser MAY ignore a BOM (some server stacks send one); orjson
    refuses it, so the thread created was dead-lettered ("201 without a threadUid") and a
    redrive created another."""
    body = b'\xef\xbb\xbf{"threadUid": "th-1", "humanUid": "hu-1"}'
    thread = await call(respond(201, content=body))
    assert (thread.thread_uid, thread.human_uid) == ("th-1", "hu-1")
    exc = await api_error(respond(422, content=b'\xef\xbb\xbf{"error": "Validation error"}'))
    assert str(exc).startswith("HTTP 422: Validation error (POST /")


def test_header_values_skip_quote_only_when_quote_would_not_change_them() -> None:
    """The fast path for event and correlation ids gives what ``quote`` gives, for every
    kind of character: control, ``%``, space, DEL, non-ASCII, astral."""
    import random
    from urllib.parse import quote

    from connector.threads_client import _HEADER_SAFE, _header_text

    rng = random.Random(11)
    alphabet = [chr(c) for c in range(0, 0x80)] + ["é", "\u2028", "\U0001f600", "\ufeff"]
    cases = ["", "ord-1", "a b", "50%", "\x7f", "\t", "é", "x\r\ny"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    for case in cases:
        assert _header_text(case) == quote(case, safe=_HEADER_SAFE), repr(case)


@pytest.mark.parametrize("status", [404, 422, 307])
async def test_an_errors_path_carries_neither_the_userinfo_nor_the_key(status: int) -> None:
    """The request line in an error (``dlq-reason``, ``/readyz``) is the path called: the
    base URL's ``user:password@`` never shows, and neither does the key when a gateway
    puts it in the base URL's path (``https://gw.example/t/<key>``)."""
    async with serving(respond(status, json={"error": "Nope"})) as base_url:
        with_secrets = base_url.replace("http://", "http://gw-user:gw-pass@") + "/t/the-api-key"
        async with client(with_secrets) as c:
            with pytest.raises(ApiError) as info:
                await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    text = f"{info.value} {info.value.path}"
    assert "/t/[redacted]/api/v1/appuid/" in text
    assert "gw-pass" not in text and "gw-user" not in text and "the-api-key" not in text
