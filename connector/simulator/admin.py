"""Admin endpoints under ``/_simulator/``, for out-of-process tests and for customers.

- ``GET  /_simulator/health``        liveness: ``{"status": "ok"}``
- ``GET  /_simulator/threads``       created threads, oldest first (``?eventId=`` filters)
- ``GET  /_simulator/stats``         responses by status, threads per event id
- ``GET  /_simulator/faults``        the current latency, faults and rate limit
- ``PUT  /_simulator/faults``        replace them (a ``BehaviorSpec``; omitted = default)
- ``POST /_simulator/reset``         forget threads and counts, re-seed, refill the bucket
- ``GET  /_simulator/openapi.yaml``  the OpenAPI document the simulator follows

They need no API key: the simulator is a test double, never a production service.
"""

from __future__ import annotations

import logging
from importlib import resources

import orjson
from aiohttp import web
from pydantic import ValidationError

from connector.simulator.responses import error_response, json_response
from connector.simulator.settings import BehaviorSpec
from connector.simulator.state import STATE

ADMIN_PREFIX = "/_simulator"
OPENAPI_RESOURCE = "threads-api-openapi.yaml"
_PACKAGE = "connector.simulator"

log = logging.getLogger(__name__)


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def list_threads(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    event_id = request.query.get("eventId")
    threads = store.all() if event_id is None else store.by_event_id(event_id)
    return json_response([thread.to_json() for thread in threads])


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].store.summary())


async def get_faults(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].behavior.model_dump(mode="json"))


async def put_faults(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"the body is not valid JSON: {exc}")
    try:
        behavior = BehaviorSpec.model_validate(body)
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        return error_response(422, detail)
    state = request.app[STATE]
    state.set_behavior(behavior)
    log.info("behaviour replaced: %s", behavior.model_dump(mode="json"))
    return json_response(behavior.model_dump(mode="json"))


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return json_response({"status": "reset"})


async def openapi(request: web.Request) -> web.Response:
    try:
        text = resources.files(_PACKAGE).joinpath(OPENAPI_RESOURCE).read_bytes()
    except FileNotFoundError:
        return error_response(404, "the OpenAPI document is not installed", title="Not Found")
    return web.Response(body=text, content_type="application/yaml")


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{ADMIN_PREFIX}/health", health)
    app.router.add_get(f"{ADMIN_PREFIX}/threads", list_threads)
    app.router.add_get(f"{ADMIN_PREFIX}/stats", stats)
    app.router.add_get(f"{ADMIN_PREFIX}/faults", get_faults)
    app.router.add_put(f"{ADMIN_PREFIX}/faults", put_faults)
    app.router.add_post(f"{ADMIN_PREFIX}/reset", reset)
    app.router.add_get(f"{ADMIN_PREFIX}/openapi.yaml", openapi)
