"""``run``'s start-up checks on a real broker and the API simulator (issue 21: "``run``
performs the same online checks at start-up and reports them through /readyz"): a wrong
API path or key pauses its app before any event arrives, a missing ACL is named by
/readyz; a probe that gets no answer pauses nothing; the probe creates no thread and is
not one of the calls the metrics count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from connector.app import Connector
from connector.localkafka import LocalKafka
from connector.simulator import ThreadsApiSimulator
from tests.harness import (
    API_KEY,
    Names,
    event,
    eventually,
    make_settings,
    produce,
    read_all,
    results,
    running,
    simulator_fixture,
    wait_until_committed,
)
from tests.kafka_helpers import create_topics
from tests.test_check_config_online import PASSWORD, USER, acl_kafka, allow  # noqa: F401
from tests.test_hostile_api import readyz

pytestmark = pytest.mark.integration


sim = simulator_fixture(seed=5)


class Gateway:
    """A gateway in front of the simulator under ``/gw``: it answers 404 (a route not
    deployed yet) until ``open`` is set, then forwards."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.open = False
        self.base_url = ""

    async def _forward(self, request: web.Request) -> web.Response:
        if not self.open:
            return web.json_response({"error": "no such route"}, status=404)
        path = request.path.removeprefix("/gw")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            ClientSession() as http,
            http.post(self.upstream + path, data=await request.read(), headers=headers) as up,
        ):
            body = await up.read()
            return web.Response(body=body, status=up.status, content_type=up.content_type)


@pytest.fixture
async def gateway(sim: ThreadsApiSimulator) -> AsyncIterator[Gateway]:
    gw = Gateway(sim.base_url)
    app = web.Application()
    app.router.add_post("/gw/{tail:.*}", gw._forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    gw.base_url = f"http://127.0.0.1:{port}/gw"
    try:
        yield gw
    finally:
        await runner.cleanup()


def sample(connector: Connector, name: str, labels: dict[str, str]) -> float:
    value = connector.metrics.registry.get_sample_value(f"threads_connector_{name}", labels)
    return value or 0.0


def not_ready(connector: Connector) -> list[str]:
    from connector.metrics import NOT_READY_REASONS

    return [r for r in NOT_READY_REASONS if sample(connector, "not_ready", {"reason": r}) == 1]


async def named(connector: Connector, text: str, timeout_s: float = 30) -> str:
    """/readyz's detail once it holds ``text`` (it must be 503 then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, detail = await readyz(connector)
        if text in detail:
            assert status == 503, detail
            return detail
        assert time.monotonic() < deadline, f"/readyz never named {text!r}: {status} {detail}"
        await asyncio.sleep(0.05)


async def test_a_wrong_path_pauses_the_app_at_start_and_resumes_when_the_probe_passes(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, gateway: Gateway
) -> None:
    """``api.base_url`` pointing at a gateway route that answers 404, with ``api.on_error:
    dead_letter`` (every 4xx is an event's own). Before, /readyz turned 200 once joined and
    each event was dead-lettered ``http_404``. Now /readyz names the app, the status and
    the URL called within a second of start, before any event; the events that come wait
    (none dead-lettered, none created, no call counted); once the gateway serves the path
    the probe passes and each event makes its thread once."""
    names = Names.fresh("start-path")
    settings = make_settings(
        kafka_bootstrap,
        gateway.base_url,
        names,
        partitions=1,
        api={"on_error": "dead_letter", "startup_probe_interval_s": 0.3},
    )
    started = time.monotonic()
    async with running(settings) as connector:
        detail = await named(connector, "answered 404")
        named_after_s = time.monotonic() - started
        assert "app demo-app: paused: start-up probe" in detail
        assert "POST http://127.0.0.1:" in detail and "/gw/api/v1/appuid/demo-app/threads" in detail
        assert "wrong path" in detail and API_KEY not in detail
        assert not_ready(connector) == ["api_path"]
        ids = [f"w-{i}" for i in range(8)]
        await produce(kafka_bootstrap, names.input, [(b"k", event(i)) for i in ids])

        async def waiting() -> bool:
            return sample(connector, "events_in_progress", {}) == len(ids)

        await eventually(waiting, 30, "the events were not fetched")
        # the probe was sent again and again while they wait: still not one call
        await asyncio.sleep(1.0)  # probes every 0.3 s: about three more, none a call
        calls_404 = {"app": "demo-app", "status_class": "4xx", "code": "404"}
        assert sample(connector, "api_responses_total", calls_404) == 0
        assert sample(connector, "api_breaker_open", {}) == 0
        assert (await readyz(connector))[0] == 503
        assert await read_all(kafka_bootstrap, names.dead) == []
        assert len(sim.store) == 0

        gateway.open = True  # the path is deployed: the next probe passes
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=30)
        await eventually(lambda: _ready(connector), 10, "never ready")
        assert not_ready(connector) == []
    print(f"\nwrong path at start: /readyz named it {named_after_s:.2f}s after start")
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sim.store.count_by_event_id() == {i: 1 for i in ids}
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids


async def _ready(connector: Connector) -> bool:
    return (await readyz(connector))[0] == 200


async def test_a_wrong_key_is_named_before_any_event_and_a_rotated_key_heals_it(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, tmp_path: Path
) -> None:
    """A key file with a wrong key and no events: before, /readyz turned 200 (the auth
    gate closes at the first refused call, and there was none). Now it names the app at
    start; rewriting the key file heals it with no event sent (the start-up probe re-reads
    the file)."""
    names = Names.fresh("start-key")
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key")
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        api={
            "api_key": None,
            "api_key_file": key_file,
            "secret_refresh_s": 0.1,
            "startup_probe_interval_s": 0.3,
        },
    )
    async with running(settings) as connector:
        detail = await named(connector, "401/403")
        assert detail.startswith("app demo-app: paused: the Threads API refuses the API key")
        assert "wrong-key" not in detail
        assert not_ready(connector) == ["api_key"]
        assert sample(connector, "auth_paused", {"app": "demo-app"}) == 1
        key_file.write_text(API_KEY)
        await eventually(lambda: _ready(connector), 15, "the rotated key did not heal it")
        assert sample(connector, "auth_paused", {"app": "demo-app"}) == 0
    assert len(sim.store) == 0  # the probes created nothing


async def test_a_probe_without_an_answer_pauses_nothing(kafka_bootstrap: str) -> None:
    """Nothing listens at ``api.base_url`` (a transient network failure for all the
    probe knows): the app is not paused, the breaker not touched, /readyz turns 200."""
    names = Names.fresh("start-none")
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:9", names, partitions=1)
    async with running(settings) as connector:
        await asyncio.wait_for(connector.checks.api_done.wait(), 15)  # the probe settled
        # and the permission checks of a sound setup pass, once (no load after)
        await asyncio.wait_for(connector.checks.kafka_done.wait(), 30)
        assert connector.checks.reason() is None
        await eventually(lambda: _ready(connector), 30, "never ready")
        assert connector.apps.pause_reason() is None
        assert connector.apps.breaker.consecutive == 0
        failed = {"app": "demo-app", "status_class": "error", "code": "request_error"}
        assert sample(connector, "api_responses_total", failed) == 0


async def test_a_missing_acl_is_named_by_readyz_until_it_is_granted(
    acl_kafka: LocalKafka,  # noqa: F811
    tmp_path: Path,
    sim: ThreadsApiSimulator,
) -> None:
    """A SASL user allowed its topics but not its consumer group: before, /readyz said
    ``not authorized: GroupAuthorizationFailedError``; now it names the ACL to add, and
    turns 200 once it is granted (re-checked every ``kafka.permission_recheck_s``)."""
    names = Names.fresh("start-acl")
    await create_topics(acl_kafka.bootstrap_servers, {names.input: 1})
    password = tmp_path / "password"
    password.write_text(PASSWORD, encoding="utf-8")
    for topic, operations in (
        (names.input, ("Describe", "Read")),
        (names.results, ("Describe", "Create", "Write")),
        (names.dead, ("Describe", "Create", "Write")),
    ):
        ops = [a for op in operations for a in ("--operation", op)]
        allow(acl_kafka, *ops, "--topic", topic)
    settings = make_settings(
        "x:1",
        sim.base_url,
        names,
        partitions=1,
        kafka={
            "bootstrap_servers": acl_kafka.listener_address("SASL"),
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password_file": str(password),
            "permission_recheck_s": 0.5,
        },
        delivery={"mode": "at_least_once"},
        dedup={"store": "memory"},
    )
    async with running(settings) as connector:
        detail = await named(connector, "missing ACL", timeout_s=60)
        group = names.group
        assert (
            f"group {group}: not authorized (missing ACL: Describe and Read on Group {group})"
            in detail
        )
        assert not_ready(connector) == ["kafka_acl"]
        allow(acl_kafka, "--operation", "Describe", "--operation", "Read", "--group", names.group)
        await eventually(lambda: _ready(connector), 60, "never ready after the ACL was granted")
        assert not_ready(connector) == []
