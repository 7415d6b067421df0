"""``POST /api/v1/appuid/{appUid}/threads`` (operation ``createThread``), as the OpenAPI says.

A ``black_hole`` simulator (``HostileSpec``) answers nothing at all. Otherwise, checks,
in order: API key (401, 403), JSON object body (400), fields (422), agent (404),
rate limit (429 + ``Retry-After``), then latency, then injected faults (502, 503, 504,
or a hang), then 201.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from connector.simulator.faults import Fault
from connector.simulator.ratelimit import TokenBucket
from connector.simulator.responses import SUCCESS_STATUS, error_response, json_response
from connector.simulator.settings import HostileMode
from connector.simulator.state import STATE, SimulatorState
from connector.simulator.store import CreatedThread
from connector.simulator.validation import (
    RequestInvalid,
    ThreadInput,
    parse_thread_request,
    resolve_human_uid,
)

CREATE_THREAD_PATH = "/api/v1/appuid/{appUid}/threads"
EVENT_ID_HEADER = "x-event-id"
CORRELATION_ID_HEADER = "x-correlation-id"

log = logging.getLogger(__name__)


async def create_thread(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    response = await _create_thread(state, request)
    state.store.record_response(response.status)
    return response


async def _create_thread(state: SimulatorState, request: web.Request) -> web.StreamResponse:
    black_hole = state.behavior.hostile.mode == "black_hole"
    if black_hole and state.take_hostile() == "black_hole":
        await state.until_stopped()  # or the client leaves: aiohttp cancels the handler
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing is ever sent
    app_uid = request.match_info["appUid"]
    auth = state.auth_status(app_uid, request.headers.get("x-api-key"))
    if auth == 401:
        return error_response(401, "the x-api-key header is missing")
    if auth == 403:
        return error_response(403, "API key does not match appUid")

    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    try:
        thread_input = parse_thread_request(body)
    except RequestInvalid as exc:
        return error_response(422, [error.to_json() for error in exc.errors])

    if not state.agent_exists(app_uid, thread_input.agent):
        return error_response(404, f"Agent not found: {thread_input.agent}")

    hostile = "none" if black_hole else state.take_hostile()
    if hostile == "slow_headers":
        await state.sleep(state.behavior.hostile.headers_delay_s)
    elif hostile != "none":
        return await _hostile(state, request, app_uid, thread_input, hostile)

    if state.bucket is not None:
        wait_s = state.bucket.try_acquire()
        if wait_s > 0:
            retry_after = TokenBucket.retry_after_s(wait_s)
            return error_response(
                429,
                f"over the rate limit of {state.bucket.rate_per_s:g}/s; "
                f"retry after {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    await state.sleep(state.latency.sample_s())
    faults = state.faults.spec
    fault = state.faults.decide()
    if fault.status is not None:
        headers = {}
        if fault is Fault.UNAVAILABLE and faults.retry_after_s is not None:
            headers["Retry-After"] = str(faults.retry_after_s)
        return error_response(fault.status, "injected by the simulator", headers=headers)
    if fault is Fault.TIMEOUT:
        state.store.record_timeout()
        if faults.timeout_creates_thread:
            thread = _record(state, request, app_uid, thread_input, answered=False)
            log.debug("thread %s created; hanging %s s", thread.thread_uid, faults.hang_s)
        await state.sleep(faults.hang_s)
        return error_response(504, f"injected timeout: no answer for {faults.hang_s:g} s")

    thread = _record(state, request, app_uid, thread_input, answered=True)
    return json_response(
        {
            "threadUid": thread.thread_uid,
            "humanUid": thread.human_uid,
            "agentUid": thread.agent_uid,
        },
        status=SUCCESS_STATUS,
    )


async def _hostile(
    state: SimulatorState,
    request: web.Request,
    app_uid: str,
    thread_input: ThreadInput,
    mode: HostileMode,
) -> web.StreamResponse:
    """One misbehaving answer (see ``HostileSpec``)."""
    spec = state.behavior.hostile
    if mode in ("retry_after", "retry_after_date"):
        value = str(spec.retry_after_s)
        if mode == "retry_after_date":
            value = email.utils.formatdate(time.time() + spec.retry_after_s, usegmt=True)
        return error_response(429, "injected by the simulator", headers={"Retry-After": value})
    if mode == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more to send: the handler ends here
    thread = _record(state, request, app_uid, thread_input, answered=True)
    head = orjson.dumps(
        {"threadUid": thread.thread_uid, "humanUid": thread.human_uid, "agentUid": thread.agent_uid}
    )
    response = web.StreamResponse(status=SUCCESS_STATUS)
    response.content_type = "application/json"
    if mode == "trickle_body":
        await response.prepare(request)
        for byte in head:
            await response.write(bytes([byte]))
            if not await state.sleep(spec.trickle_interval_s):
                break
        return response
    # huge_body: {"threadUid": ..., "padding": "xxx..."} of exactly body_bytes
    prefix = head[:-1] + b', "padding": "'
    padding = max(0, spec.body_bytes - len(prefix) - 2)
    response.content_length = len(prefix) + padding + 2
    await response.prepare(request)
    await response.write(prefix)
    chunk = b"x" * 65_536
    while padding > 0:
        await response.write(chunk[: min(padding, len(chunk))])
        padding -= min(padding, len(chunk))
    await response.write(b'"}')
    return response


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw.strip():
        return error_response(400, "the request body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"the body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    return body


def _record(
    state: SimulatorState,
    request: web.Request,
    app_uid: str,
    thread_input: ThreadInput,
    *,
    answered: bool,
) -> CreatedThread:
    thread = CreatedThread(
        thread_uid=state.new_thread_uid(),
        app_uid=app_uid,
        agent_uid=thread_input.agent_uid,
        human_uid=resolve_human_uid(
            app_uid, thread_input.identifier_field, thread_input.identifier_value
        ),
        message_type=thread_input.message_type,
        message=thread_input.message,
        identifier_field=thread_input.identifier_field,
        identifier_value=thread_input.identifier_value,
        event_id=request.headers.get(EVENT_ID_HEADER),
        correlation_id=request.headers.get(CORRELATION_ID_HEADER),
        traceparent=request.headers.get("traceparent"),
        created_at=datetime.now(UTC),
        answered=answered,
    )
    state.store.add(thread)
    return thread
