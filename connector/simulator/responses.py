"""JSON responses: the success body and ``{"error": ..., "detail": ...}`` error bodies."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

# The ``error`` text per status: the OpenAPI's response descriptions (429 is the
# simulator's own rate limit; the document does not list it).
ERROR_TITLES: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden - API key does not match appUid",
    404: "Agent not found",
    422: "Validation error",
    429: "Too Many Requests",
    502: "Agent service returned an error",
    503: "Agent service unavailable",
    504: "Agent service did not respond in time",
}
SUCCESS_STATUS = 201


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
) -> web.Response:
    """An error body; ``title`` defaults to the OpenAPI's description of the status."""
    title = title or ERROR_TITLES.get(status) or HTTPStatus(status).phrase
    return json_response({"error": title, "detail": detail}, status=status, headers=headers)
