"""Hostile review, round 2: API answers, templates and events nobody tried before, end to
end on a real broker with a real ``Connector`` and a real HTTP server playing the API.

Each test names the defect it found; each failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from tests.harness import (
    Names,
    event,
    eventually,
    make_settings,
    produce,
    read_all,
    results,
    running,
)

pytestmark = pytest.mark.integration

Answer = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def fake_api(answer: Answer) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server playing the Threads API: ``answer`` gets each request's JSON
    body; yields the base URL and the bodies received (the calls made). A body that is not
    an object (the start-up probe's ``[]``) is answered 400, as the API answers it, and is
    not a call."""
    calls: list[dict[str, Any]] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            return web.json_response({"title": "Bad Request", "status": 400}, status=400)
        calls.append(body)
        return await answer(body)

    server = RawTestServer(handler)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), calls
    finally:
        await server.close()


# -- a 201 whose humanUid is 1,000 lists deep ---------------------------------------------


async def test_a_201_with_a_deeply_nested_human_uid_publishes_the_thread_once(
    kafka_bootstrap: str,
) -> None:
    """Defect: ``str()`` of the 201's ``humanUid`` (any JSON the API sent) raised
    RecursionError for 1,000 nested lists (orjson accepts 1,023): not an ApiError, it
    escaped the call, the thread created was never published and the event was replayed
    (a second thread). Now a humanUid that is not a string is published as ""."""
    deep = "[" * 1000 + "]" * 1000

    async def answer(body: dict[str, Any]) -> web.StreamResponse:
        raw = f'{{"threadUid": "th-{len(calls)}", "humanUid": {deep}, "agentUid": {deep}}}'
        return web.Response(status=201, body=raw.encode(), content_type="application/json")

    names = Names.fresh("deep")
    async with fake_api(answer) as (base_url, calls):
        settings = make_settings(kafka_bootstrap, base_url, names)
        async with running(settings):
            await produce(kafka_bootstrap, names.input, [(b"k", event("deep-1"))])

            async def published() -> bool:
                return len(await results(kafka_bootstrap, names.results)) == 1

            await eventually(published)
            await asyncio.sleep(1.0)  # time for a replay, had there been one
        out = await results(kafka_bootstrap, names.results)
    assert len(calls) == 1
    assert [(r["eventId"], r["threadUid"], r["humanUid"]) for r in out] == [("deep-1", "th-1", "")]
    assert out[0]["agentUid"] == "agent-orders"  # the request's, the answer's was unusable


async def created_201(body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"threadUid": "th-1", "humanUid": "h-1"}, status=201)


async def dead_letters(bootstrap: str, topic: str) -> list[tuple[str, str]]:
    """(event id, dlq-code) of each dead letter."""
    out = []
    for m in await read_all(bootstrap, topic):
        headers = dict(m.headers)
        out.append((headers["dlq-event-id"].decode(), headers["dlq-code"].decode()))
    return out


# -- a template field 300 levels deep -------------------------------------------------------


async def test_a_template_field_nested_300_deep_is_dead_lettered_not_fatal(
    kafka_bootstrap: str,
) -> None:
    """Defect: a template field holding JSON nested deeper than orjson writes (255) made
    ``orjson.dumps`` raise a TypeError that ``Router.build`` did not catch: the replica
    stopped on the event, and every replica that took the partition after it (a poison
    pill stalling the group). Now it is dead-lettered (``template_error``), no call."""
    deep = orjson.Fragment(b"[" * 300 + b"]" * 300)
    names = Names.fresh("deeptpl")
    async with fake_api(created_201) as (base_url, calls):
        settings = make_settings(kafka_bootstrap, base_url, names)
        async with running(settings):
            await produce(
                kafka_bootstrap,
                names.input,
                [
                    (b"k", event("bad-1", data={"orderId": deep})),
                    (b"k", event("good-1")),
                ],
            )

            async def settled() -> bool:
                dead = await read_all(kafka_bootstrap, names.dead)
                return len(dead) == 1 and len(await results(kafka_bootstrap, names.results)) == 1

            await eventually(settled)
        assert await dead_letters(kafka_bootstrap, names.dead) == [("bad-1", "template_error")]
        assert [r["eventId"] for r in await results(kafka_bootstrap, names.results)] == ["good-1"]
        assert len(calls) == 1


# -- a deep link naming an event field the event lacks ------------------------------------


async def test_a_deep_link_field_missing_from_the_event_is_dead_lettered_before_the_call(
    kafka_bootstrap: str,
) -> None:
    """Defect: the deep link is rendered after the thread is created, and a field of the
    event it names (documented: ``results.deep_link_template`` may use event fields) that
    the event lacks raised KeyError there: the replica stopped with a thread created and
    no result, and the replay created another (a thread per restart). Now the event is
    dead-lettered before any call (``missing_field``), like a message template field."""
    names = Names.fresh("linkfield")
    async with fake_api(created_201) as (base_url, calls):
        settings = make_settings(
            kafka_bootstrap,
            base_url,
            names,
            results={"deep_link_template": "https://app.example/${data.shop}/t/${threadUid}"},
        )
        async with running(settings):
            await produce(
                kafka_bootstrap,
                names.input,
                [
                    (b"k", event("no-shop")),
                    (b"k", event("shop-1", data={"orderId": "A-1", "shop": "s1"})),
                ],
            )

            async def settled() -> bool:
                dead = await read_all(kafka_bootstrap, names.dead)
                return len(dead) == 1 and len(await results(kafka_bootstrap, names.results)) == 1

            await eventually(settled)
        assert await dead_letters(kafka_bootstrap, names.dead) == [("no-shop", "missing_field")]
        out = await results(kafka_bootstrap, names.results)
        assert [(r["eventId"], r["deepLink"]) for r in out] == [
            ("shop-1", "https://app.example/s1/t/th-1")
        ]
        assert len(calls) == 1


# -- values that would rewrite the deep link ------------------------------------------------


async def test_values_substituted_into_the_deep_link_are_percent_encoded(
    kafka_bootstrap: str,
) -> None:
    """Defect: the deep link substituted the API's threadUid and the event's fields as they
    were, so a value with ``/``, ``..``, ``?``, ``&``, ``#``, a newline or a scheme rewrote
    the link sent to users (another path, extra query parameters, a fragment). Every value
    substituted is now percent-encoded (RFC 6570 simple expansion: only unreserved kept);
    the template's own text is left as written."""
    thread_uid = "../../admin?x=1#top\r\nSet-Cookie: a"

    async def answer(body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"threadUid": thread_uid, "humanUid": "h/1"}, status=201)

    names = Names.fresh("linkenc")
    template = "https://app.example/agent?thread=${threadUid}&shop=${data.shop}&u=${humanUid}"
    async with fake_api(answer) as (base_url, _calls):
        settings = make_settings(
            kafka_bootstrap, base_url, names, results={"deep_link_template": template}
        )
        async with running(settings):
            shop = "javascript:alert(1)&admin=true é"
            await produce(
                kafka_bootstrap,
                names.input,
                [(b"k", event("enc-1", data={"orderId": "A-1", "shop": shop}))],
            )

            async def published() -> bool:
                return len(await results(kafka_bootstrap, names.results)) == 1

            await eventually(published)
        [out] = await results(kafka_bootstrap, names.results)
    assert out["threadUid"] == thread_uid  # the result keeps the API's value as it is
    assert out["deepLink"] == (
        "https://app.example/agent?thread=..%2F..%2Fadmin%3Fx%3D1%23top%0D%0ASet-Cookie%3A%20a"
        "&shop=javascript%3Aalert%281%29%26admin%3Dtrue%20%C3%A9&u=h%2F1"
    )


# -- a key file rotated to bytes that are not UTF-8 ----------------------------------------


async def test_a_key_file_rotated_to_bytes_that_are_not_utf8_pauses_calls_then_heals(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Defect: the key file is re-read as UTF-8 and only OSError was translated, so a
    secret rotated to bytes that are not UTF-8 (a binary or Latin-1 value, a wrong Secret
    key) raised UnicodeDecodeError out of the call: the replica stopped, and at start-up
    it stopped with a traceback quoting the byte, not the file. Now it is an unusable key
    like an embedded newline: calls pause (readiness names the file), and a fixed file
    heals it; nothing is dead-lettered."""
    key_file = tmp_path / "api-key"
    key_file.write_text("demo-key")

    async def answer(body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"threadUid": f"th-{len(calls)}"}, status=201)

    names = Names.fresh("keybytes")
    async with fake_api(answer) as (base_url, calls):
        settings = make_settings(
            kafka_bootstrap,
            base_url,
            names,
            api={
                "api_key": None,
                "api_key_file": key_file,
                "secret_refresh_s": 0.1,
                "auth_probe_interval_s": 0.3,
            },
        )
        async with running(settings) as connector:
            await produce(kafka_bootstrap, names.input, [(b"k", event("before"))])

            async def published(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return len(await results(kafka_bootstrap, names.results)) == n

                return check

            await eventually(await published(1))
            key_file.write_bytes(b"caf\xe9-key")  # Latin-1: not UTF-8
            await asyncio.sleep(0.3)  # past secret_refresh_s: the next call re-reads it
            await produce(kafka_bootstrap, names.input, [(b"k", event("during"))])

            async def paused() -> bool:
                reason = connector.apps.pause_reason() or ""
                return "api-key" in reason and "cannot be sent" in reason

            await eventually(paused)
            assert "\\xe9" not in (connector.apps.pause_reason() or "")
            key_file.write_text("demo-key")  # fixed
            await eventually(await published(2))
            assert connector.apps.pause_reason() is None
        assert await read_all(kafka_bootstrap, names.dead) == []
    assert len(calls) == 2


# -- an API that redirects every call ------------------------------------------------------


async def test_a_redirecting_api_opens_the_breaker_instead_of_dead_lettering_every_event(
    kafka_bootstrap: str,
) -> None:
    """Defect: a redirect (not followed) was a permanent error, so a base URL the API
    redirects (http:// to https://, a moved host or gateway) dead-lettered every event
    while /readyz stayed green. It says nothing about the event: it is the API host's
    (or the configuration's) failure, like a 5xx storm. Now the circuit breaker opens,
    readiness names the redirect, no event is dead-lettered, and calls resume once the
    API answers."""
    redirecting = True

    async def answer(body: dict[str, Any]) -> web.StreamResponse:
        if redirecting:
            return web.Response(status=301, headers={"Location": "https://api.example/"})
        return web.json_response({"threadUid": f"th-{len(calls)}"}, status=201)

    names = Names.fresh("redirect")
    async with fake_api(answer) as (base_url, calls):
        settings = make_settings(
            kafka_bootstrap,
            base_url,
            names,
            api={"breaker_failure_threshold": 2, "breaker_probe_interval_s": 0.3},
        )
        async with running(settings) as connector:
            await produce(kafka_bootstrap, names.input, [(b"k", event(f"r-{i}")) for i in range(3)])

            async def paused() -> bool:
                return "HTTP 301" in (connector.apps.pause_reason() or "")

            await eventually(paused)
            assert await read_all(kafka_bootstrap, names.dead) == []
            redirecting = False

            async def all_published() -> bool:
                return len(await results(kafka_bootstrap, names.results)) == 3

            await eventually(all_published)
            assert connector.apps.pause_reason() is None
        assert await read_all(kafka_bootstrap, names.dead) == []
