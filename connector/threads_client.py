"""The Threads API client: one attempt of ``POST /api/v1/appuid/{appUid}/threads``.

The only module that imports httpx. Its errors are translated here, most specific first,
into the connector's tree (``connector.errors``); retries live in ``calls``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from urllib.parse import quote

import httpx
import orjson
from pydantic import SecretStr

from connector import __version__
from connector.errors import AuthError, PermanentApiError, RetriableApiError
from connector.routing import ThreadRequest

# printable ASCII (and space) but '%' stays as it is in the x-event-id header
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
RETRIABLE_STATUSES = frozenset({429, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class ApiThread:
    """The 201 body."""

    thread_uid: str
    human_uid: str
    agent_uid: str


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_ts = time.time() if now is None else now
    return max(0.0, when.timestamp() - now_ts)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class ThreadsClient:
    """One shared ``httpx.AsyncClient``, its pool sized to the in-flight cap."""

    def __init__(
        self,
        base_url: str,
        api_key: Callable[[], SecretStr],
        *,
        connect_timeout_s: float,
        request_timeout_s: float,
        max_in_flight: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=max_in_flight, max_keepalive_connections=max_in_flight
            ),
            headers={"user-agent": f"threads-connector/{__version__}"},
            transport=transport,
        )

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
        await self._http.aclose()

    async def create_thread(
        self, request: ThreadRequest, *, event_id: str, correlation_id: str
    ) -> ApiThread:
        """One attempt. Raises AuthError, PermanentApiError or RetriableApiError."""
        url = f"/api/v1/appuid/{quote(request.app_uid, safe='')}/threads"
        headers = {
            "x-api-key": self._api_key().get_secret_value(),
            "content-type": "application/json",
            # event ids are the producer's data: percent-encode what a header cannot carry
            "x-event-id": quote(event_id, safe=_HEADER_SAFE),
            "x-correlation-id": correlation_id,
        }
        try:
            response = await self._http.post(
                url, content=orjson.dumps(request.body()), headers=headers
            )
        except httpx.ConnectTimeout as exc:
            raise RetriableApiError("connect timeout", status=None) from exc
        except httpx.ConnectError as exc:
            raise RetriableApiError(f"connection failed: {exc}") from exc
        except httpx.TimeoutException as exc:  # read/write timeout: the call may have landed
            raise RetriableApiError("timeout", outcome_unknown=True) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise RetriableApiError(f"protocol error: {exc}", outcome_unknown=True) from exc
        except httpx.LocalProtocolError as exc:  # we could not even form the request
            raise PermanentApiError(f"request could not be sent: {exc}") from exc
        except httpx.TransportError as exc:
            raise RetriableApiError(f"transport error: {exc}", outcome_unknown=True) from exc
        return _interpret(response)


def _safe_detail(response: httpx.Response) -> str:
    """What of an error body may go into a dead letter and a log: the ``error`` title and
    the names of the fields at fault, never free text (it could echo the system message)."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "(no JSON body)"
    if not isinstance(data, dict):
        return "(no error object)"
    parts = []
    title = data.get("error")
    if isinstance(title, str):
        parts.append(title[:120])
    detail = data.get("detail")
    if isinstance(detail, list):
        fields = sorted(
            {str(d["field"])[:60] for d in detail if isinstance(d, dict) and "field" in d}
        )
        if fields:
            parts.append("fields: " + ", ".join(fields))
    return "; ".join(parts) or "(no error title)"


def _interpret(response: httpx.Response) -> ApiThread:
    status = response.status_code
    if status == 201:
        try:
            data = orjson.loads(response.content)
            return ApiThread(
                thread_uid=str(data["threadUid"]),
                human_uid=str(data.get("humanUid") or ""),
                agent_uid=str(data.get("agentUid") or ""),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise PermanentApiError("201 without a threadUid in its body", status=201) from exc
    detail = _safe_detail(response)
    if status in AUTH_STATUSES:
        raise AuthError(f"HTTP {status}: {detail}", status=status)
    if status in RETRIABLE_STATUSES or status >= 500:
        raise RetriableApiError(
            f"HTTP {status}",
            status=status,
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    raise PermanentApiError(f"HTTP {status}: {detail}", status=status)
