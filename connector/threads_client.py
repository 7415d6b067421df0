"""The Threads API client: one attempt of ``POST /api/v1/appuid/{appUid}/threads``.

The API's HTTP client (aiohttp: chosen on measurements, see ``bench/http_clients.py`` and
docs/benchmarks.md). Its errors are translated here, most specific
first, into the connector's tree (``connector.errors``); retries live in ``calls``.

Each attempt is bounded: ``request_timeout_s`` is a TOTAL deadline (connect, send,
headers and the whole body), and the body is read up to ``max_response_bytes``; a body
over it is cut off and the attempt fails with an unknown outcome (a 201 probably did
create a thread). Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from connector import __version__
from connector.errors import (
    ApiError,
    ApiKeyInvalid,
    AuthError,
    PermanentApiError,
    RetriableApiError,
)
from connector.proxy import Proxy
from connector.routing import ThreadRequest
from connector.tracing import TRACING

_URL_TEMPLATE = "/api/v1/appuid/{appUid}/threads"
# printable ASCII (and space) but '%' stays as it is in the x-event-id header
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@functools.lru_cache(maxsize=1024)  # app uids come from the routes: a few
def _threads_path(app_uid: str) -> str:
    return f"/api/v1/appuid/{quote(app_uid, safe='')}/threads"


def _header_text(value: str) -> str:
    """``value`` percent-encoded to what a header can carry (printable ASCII; ``%`` is
    encoded so the encoding reads back unambiguously). The common case, nothing to encode,
    skips ``quote`` (per event, twice)."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return quote(value, safe=_HEADER_SAFE)


# 408 and 425: not processed, a retry is safe (RFC 9110 §15.5.9, RFC 8470 §5.2)
RETRIABLE_STATUSES = frozenset({408, 425, 429, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ApiThread:
    """The 201 body."""

    thread_uid: str
    human_uid: str
    agent_uid: str
    status: int = 201  # the spec's; another 2xx with a threadUid is a thread created too


@dataclass(frozen=True, slots=True)
class _Response:
    """What an attempt keeps of a response: the status, ``Retry-After``, the body."""

    status: int
    retry_after: str | None
    content: bytes


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3).
    Anything else (garbage, a negative or fractional number) is None: no instruction."""
    if not value:
        return None
    value = value.strip()
    # isascii: str.isdigit() is also true of "\u00b2", which float() refuses, and the
    # ValueError would escape the call (a replica stopped by one header)
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_ts = time.time() if now is None else now
    return max(0.0, when.timestamp() - now_ts)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verification against ``ca_file`` (a private CA) when given, the system store
    otherwise."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return ssl.create_default_context()


class _BodyTooLarge(Exception):
    pass


class ThreadsClient:
    """One shared ``aiohttp.ClientSession``, its pool sized to the in-flight cap.

    The session is made on first use (aiohttp wants a running loop); ``close()`` is
    idempotent.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Callable[[], SecretStr],
        *,
        connect_timeout_s: float,
        request_timeout_s: float,
        max_in_flight: int,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        ca_file: Path | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._base_path = urlsplit(self._base_url).path  # a gateway's prefix, or ""
        self._api_key = api_key
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_in_flight = max_in_flight
        self._max_response_bytes = max_response_bytes
        self._ssl = tls_context(ca_file) if base_url.startswith("https:") else None
        self._proxy = proxy
        # Proxy-Authorization: on the CONNECT for an https:// API (the API never sees it), in
        # the request for an http:// one (aiohttp sends proxy_headers with CONNECT only)
        self._proxy_headers: dict[str, str] | None = None
        self._request_headers: dict[str, str] = {}
        if proxy is not None and proxy.username is not None:
            password = proxy.password.get_secret_value() if proxy.password else ""
            auth = {"proxy-authorization": aiohttp.encode_basic_auth(proxy.username, password)}
            if self._ssl is not None:
                self._proxy_headers = auth
            else:
                self._request_headers = auth
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise RuntimeError("the Threads API client is closed")
            connector = aiohttp.TCPConnector(
                limit=self._max_in_flight,
                limit_per_host=0,
                ssl=self._ssl if self._ssl is not None else True,
            )
            self._session = aiohttp.ClientSession(
                # resolved once (connector.proxy): not trust_env, which also reads ~/.netrc
                proxy=self._proxy.url if self._proxy is not None else None,
                # no base_url: aiohttp's refuses a path without a trailing slash and drops
                # one with it; the request's URL is the base URL's text + the API's path
                connector=connector,
                # the total deadline is ours (asyncio.timeout around the whole attempt)
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
                # ask for an uncompressed body, and inflate one sent anyway ourselves, with
                # the body limit applied to the inflated bytes (a gzip bomb cannot grow)
                headers={
                    "user-agent": f"threads-connector/{__version__}",
                    "accept-encoding": "identity",
                },
                auto_decompress=False,
            )
        return self._session

    async def __aenter__(self) -> ThreadsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def create_thread(
        self, request: ThreadRequest, *, event_id: str, correlation_id: str
    ) -> ApiThread:
        """One attempt. Raises AuthError, PermanentApiError or RetriableApiError."""
        # the base URL's own path (a gateway's prefix) is kept: settings strip its "/"
        api_path = _threads_path(request.app_uid)
        url = self._base_url + api_path
        # validated where it is read (config.CachedSecret); checked again here because
        # aiohttp would send non-ASCII as UTF-8 and quote a bad value in its errors
        api_key = self._api_key().get_secret_value()
        if not (api_key and api_key.isascii() and api_key.isprintable()):
            raise ApiKeyInvalid("the API key cannot be sent as a header value")
        # for errors: the path called, not the host nor its userinfo, and not the key
        # where a gateway wants it in the base URL's path too
        path = self._base_path + api_path
        if api_key in path:
            path = path.replace(api_key, _REDACTED)
        headers = {
            "x-api-key": api_key,
            "content-type": "application/json",
            # event ids are the producer's data: percent-encode what a header cannot carry
            "x-event-id": _header_text(event_id),
            "x-correlation-id": _header_text(correlation_id),
            **self._request_headers,
        }
        body = orjson.dumps(request.body())
        if TRACING.on:
            return await self._traced(url, path, body, headers, api_key)
        return await self._attempt(url, path, body, headers, api_key)

    async def _traced(
        self, url: str, path: str, body: bytes, headers: dict[str, str], api_key: str
    ) -> ApiThread:
        """The attempt inside a CLIENT span whose ``traceparent`` the request carries."""
        split = urlsplit(url)
        attributes = {
            "http.request.method": "POST",
            "url.template": _URL_TEMPLATE,
            "server.address": split.hostname or "",
            "server.port": split.port or (443 if split.scheme == "https" else 80),
        }
        with TRACING.span(f"POST {_URL_TEMPLATE}", SpanKind.CLIENT, attributes=attributes) as span:
            TRACING.inject(headers)
            try:
                thread = await self._attempt(url, path, body, headers, api_key)
            except ApiError as exc:
                if exc.status is not None:
                    span.set_attribute("http.response.status_code", exc.status)
                kind = getattr(exc, "kind", None)
                span.set_attribute("error.type", kind or str(exc.status or type(exc).__name__))
                raise
            span.set_attribute("http.response.status_code", thread.status)
            return thread

    async def _attempt(
        self, url: str, path: str, body: bytes, headers: dict[str, str], api_key: str
    ) -> ApiThread:
        try:
            async with asyncio.timeout(self._request_timeout_s):
                response = await self._post(url, body, headers)
        except _BodyTooLarge as exc:
            raise RetriableApiError(
                f"response body unusable (over {self._max_response_bytes} bytes, or an "
                "encoding that cannot be read): cut off",
                outcome_unknown=True,
                kind="body_too_large",
                path=path,
            ) from exc
        except aiohttp.ClientHttpProxyError as exc:  # CONNECT refused: nothing was sent
            raise RetriableApiError(
                f"the proxy refused the tunnel: HTTP {exc.status}{_proxy_hint(exc.status)}",
                kind="proxy_error",
                path=path,
            ) from exc
        except aiohttp.ClientProxyConnectionError as exc:
            raise RetriableApiError(
                f"the proxy cannot be reached: {exc.os_error.strerror or exc}",
                kind="proxy_error",
                path=path,
            ) from exc
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise RetriableApiError(f"TLS failure: {exc}", kind="tls_error", path=path) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise RetriableApiError("connect timeout", kind="connect_error", path=path) from exc
        except aiohttp.ClientConnectorError as exc:
            raise RetriableApiError(
                f"connection failed: {exc}", kind="connect_error", path=path
            ) from exc
        except TimeoutError as exc:  # the total deadline: the call may have landed
            raise RetriableApiError(
                f"no complete answer within {self._request_timeout_s:g}s",
                outcome_unknown=True,
                kind="timeout",
                path=path,
            ) from exc
        except aiohttp.ClientError as exc:  # reset, disconnect, bad payload: may have landed
            raise RetriableApiError(
                f"protocol error: {type(exc).__name__} (no complete answer)",
                outcome_unknown=True,
                kind="protocol_error",
                path=path,
            ) from exc
        except (ValueError, UnicodeError) as exc:  # we could not even form the request
            # no exception text: it could quote a header value
            raise PermanentApiError(f"request could not be sent: {type(exc).__name__}") from exc
        return _interpret(response, api_key, path)

    async def probe(self, app_uid: str) -> tuple[int, str]:
        """The status of a request that cannot create a thread (a JSON array as the body,
        which the API refuses with 400 after the path and the key), and the URL called:
        400 (or 422) proves the path and the key, 401/403 a wrong key, 404/405 a wrong path.
        Raises RetriableApiError when no answer comes (the text never holds the key)."""
        url = self._base_url + _threads_path(app_uid)
        api_key = self._api_key().get_secret_value()
        headers = {
            "x-api-key": api_key,
            "content-type": "application/json",
            **self._request_headers,
        }
        try:
            async with asyncio.timeout(self._request_timeout_s):
                response = await self._post(url, b"[]", headers)
        except aiohttp.ClientHttpProxyError as exc:
            raise RetriableApiError(
                f"the proxy refused the tunnel: HTTP {exc.status}{_proxy_hint(exc.status)}",
                kind="proxy_error",
            ) from exc
        except aiohttp.ClientProxyConnectionError as exc:
            raise RetriableApiError(
                f"the proxy cannot be reached: {exc.os_error.strerror or exc}", kind="proxy_error"
            ) from exc
        except (aiohttp.ClientError, TimeoutError, _BodyTooLarge, ValueError) as exc:
            raise RetriableApiError(
                f"no answer: {type(exc).__name__}", kind="connect_error"
            ) from exc
        return response.status, url

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> _Response:
        """The response, its body read up to the limit. An error status keeps its meaning
        with an oversized body (the body is dropped); a 201 without its whole body fails."""
        limit = self._max_response_bytes
        async with self._http().post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            proxy_headers=self._proxy_headers,
        ) as response:
            retry_after = response.headers.get("retry-after")
            inflate = _inflater(response.headers.get("content-encoding"))
            chunks: list[bytes] = []
            usable = inflate is not None and (response.content_length or 0) <= limit
            size = 0
            if inflate is not None and usable:
                async for raw in response.content.iter_chunked(_CHUNK_BYTES):
                    try:
                        piece = inflate(raw, limit - size + 1)  # one byte over: too large
                    except zlib.error:
                        usable = False  # not what its content-encoding says
                        break
                    size += len(piece)
                    chunks.append(piece)
                    if size > limit:
                        usable = False
                        break
            if not usable:
                response.close()  # the connection is not reusable mid-body
                if response.status == 201:
                    raise _BodyTooLarge
                chunks = []
            return _Response(response.status, retry_after, b"".join(chunks))


def _proxy_hint(status: int) -> str:
    if status == 407:
        return " (proxy authentication required: check api.proxy_auth_file)"
    return ""


Inflater = Callable[[bytes, int], bytes]


def _inflater(encoding: str | None) -> Inflater | None:
    """How to turn the body's bytes into content, at most N bytes per call; None for an
    encoding we cannot read (then, as for an oversized body, nothing of it is used)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return lambda data, _limit: data
    if name not in ("gzip", "x-gzip", "deflate"):
        return None
    # gzip or zlib header detected (47); raw deflate, which some servers send, is not
    state = zlib.decompressobj(47)

    def inflate(data: bytes, limit: int) -> bytes:
        return state.decompress(state.unconsumed_tail + data, max(1, limit))

    return inflate


_BOM = b"\xef\xbb\xbf"


def _json(content: bytes) -> Any:
    """The body's JSON, a UTF-8 byte order mark ignored (RFC 8259 §8.1 allows it; orjson
    refuses it, and a 201 that created a thread would have been dead-lettered)."""
    return orjson.loads(content.removeprefix(_BOM))


_DETAIL_FIELDS_MAX = 10  # field names an error keeps; the rest are counted
_REDACTED = "[redacted]"


def _scalar_text(value: object) -> str | None:
    """A JSON scalar of the API's as text; None for an array or an object. Never ``str()``
    of a container: its repr recurses, and 1,000 nested lists (orjson accepts 1,023)
    raise RecursionError, which escapes the call and stops the replica."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode()
    return None


def _safe_detail(response: _Response, secret: str = "") -> str:
    """What of an error body may go into a dead letter and a log: the ``error`` title and
    the names of the fields at fault, never free text (it could echo the system message).

    Bounded (a 422 naming 10,000 fields made a log line of 600 KB per dead letter), and
    ``secret`` (the API key sent) is redacted before anything is cut: an API that echoes
    the ``x-api-key`` in its error would otherwise put it in ``dlq-reason``."""

    def clean(text: str, limit: int) -> str:
        if secret:
            text = text.replace(secret, _REDACTED)
        return text[:limit]

    try:
        data = _json(response.content)
    except orjson.JSONDecodeError:
        return "(no JSON body)"
    if not isinstance(data, dict):
        return "(no error object)"
    parts = []
    title = data.get("error")
    if isinstance(title, str):
        parts.append(clean(title, 120))
    detail = data.get("detail")
    if isinstance(detail, list):
        names = {_scalar_text(d["field"]) for d in detail if isinstance(d, dict) and "field" in d}
        fields = sorted({clean(name, 60) for name in names if name is not None})
        if fields:
            shown = ", ".join(fields[:_DETAIL_FIELDS_MAX])
            if len(fields) > _DETAIL_FIELDS_MAX:
                shown += f" (+{len(fields) - _DETAIL_FIELDS_MAX} more)"
            parts.append("fields: " + shown)
    return "; ".join(parts) or "(no error title)"


def _interpret(response: _Response, secret: str = "", path: str = "") -> ApiThread:
    """The thread of a 2xx, or the error of any other answer. An error's message ends with
    the request line (``POST <path>``): a wrong ``api.base_url`` shows in the dead letter's
    reason and in readiness (the path only: no host, no key)."""
    status = response.status
    called = f" (POST {path})" if path else ""
    if 200 <= status < 300:
        # a 2xx is a success: the thread exists if its body says so, whatever the code (a
        # 200 from a gateway or a new API version was dead-lettered, its result lost)
        try:
            data = _json(response.content)
            thread_uid = data["threadUid"]
            # the spec's string: str() would publish null as "None" and call it a success
            if not isinstance(thread_uid, str) or not thread_uid:
                raise TypeError("threadUid is not a non-empty string")
            # the spec's strings too; anything else is not published (not its repr)
            human_uid, agent_uid = data.get("humanUid"), data.get("agentUid")
            return ApiThread(
                thread_uid=thread_uid,
                human_uid=human_uid if isinstance(human_uid, str) else "",
                agent_uid=agent_uid if isinstance(agent_uid, str) else "",
                status=status,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            what = "" if status == 201 else ": the thread may exist"
            raise PermanentApiError(
                f"{status} without a threadUid in its body{what}{called}", status=status, path=path
            ) from exc
    if status == 407:  # a proxy's answer to a plain-http request: not the API's, not the event's
        raise RetriableApiError(
            f"HTTP 407 from the proxy{_proxy_hint(status)}", kind="proxy_error", path=path
        )
    if 300 <= status < 400:
        # not followed: a redirect says nothing of the event but that the base URL is not
        # where the API answers (http:// to https://, a moved host): the API host's
        # failure, for the circuit breaker, not a dead letter for every event
        raise RetriableApiError(
            f"HTTP {status}: redirected, not followed (is api.base_url right?){called}",
            status=status,
            kind="redirect",
            path=path,
        )
    detail = _safe_detail(response, secret)
    if status in AUTH_STATUSES:
        raise AuthError(f"HTTP {status}: {detail}{called}", status=status, path=path)
    if status in RETRIABLE_STATUSES or status >= 500:
        raise RetriableApiError(
            f"HTTP {status}",
            status=status,
            retry_after_s=parse_retry_after(response.retry_after),
            path=path,
        )
    raise PermanentApiError(f"HTTP {status}: {detail}{called}", status=status, path=path)
