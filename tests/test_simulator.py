"""The Threads API simulator: against its own OpenAPI document, over real HTTP, no mocks."""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr, ValidationError

from connector.simulator import (
    AppSpec,
    BehaviorSpec,
    CreatedThread,
    Fault,
    FaultModel,
    FaultSpec,
    HostileSpec,
    LatencySampler,
    LatencySpec,
    SimulatorSettings,
    ThreadsApiSimulator,
    ThreadStore,
    TokenBucket,
    make_private_ca,
    resolve_human_uid,
    run_in_thread,
)
from connector.simulator import validation as rules
from connector.simulator.api import CREATE_THREAD_PATH
from connector.simulator.cli import build_parser, main, settings_from_args
from connector.simulator.responses import ERROR_TITLES

OPENAPI = Path(__file__).parents[1] / "connector" / "simulator" / "threads-api-openapi.yaml"
PATH = "/api/v1/appuid/demo-app/threads"
KEY = {"x-api-key": "demo-key"}
BODY: dict[str, Any] = {"agentUid": "agent-orders", "message": "hi", "externalUserId": "u-1"}
SIMULATOR_ONLY_CODES = {429}  # the simulator's rate limit; the document does not list 429


@pytest.fixture
async def sim() -> AsyncIterator[ThreadsApiSimulator]:
    settings = SimulatorSettings(
        seed=7,
        apps={
            "demo-app": AppSpec(api_key=SecretStr("demo-key"), agents=["agent-orders"]),
            "open-app": AppSpec(api_key=SecretStr("open-key")),
        },
    )
    async with ThreadsApiSimulator(settings) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: ThreadsApiSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5) as c:
        yield c


def body(**changes: Any) -> dict[str, Any]:
    """BODY with changes; a value of ... removes the field."""
    out = {**BODY, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def openapi_operation() -> dict[str, Any]:
    doc = yaml.safe_load(OPENAPI.read_text())
    operation: dict[str, Any] = doc["paths"][CREATE_THREAD_PATH]["post"]
    return operation


# -- the OpenAPI document itself: catch drift ----------------------------------------------


def test_validation_rules_match_openapi() -> None:
    op = openapi_operation()
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    props: dict[str, Any] = schema["properties"]
    assert op["requestBody"]["required"] is True
    assert set(schema["required"]) == set(rules.REQUIRED_FIELDS)
    assert {n for n, p in props.items() if p["type"] == "string"} == set(rules.STRING_FIELDS)
    assert set(props) == set(rules.STRING_FIELDS)
    assert props["messageType"]["enum"] == list(rules.MESSAGE_TYPES)
    assert props["messageType"]["default"] == rules.DEFAULT_MESSAGE_TYPE
    assert {n: p["maxLength"] for n, p in props.items() if "maxLength" in p} == rules.MAX_LENGTHS
    exclusive = {n for n, p in props.items() if "Mutually exclusive" in p["description"]}
    assert exclusive == set(rules.IDENTIFIER_FIELDS)
    chars = re.search(r"Valid characters are (\S+?)\.", props["externalUserId"]["description"])
    assert chars is not None
    assert {"externalUserId": f"^[{chars.group(1)}]+$"} == rules.PATTERNS
    (app_uid,) = op["parameters"]
    assert (app_uid["name"], app_uid["in"], app_uid["schema"]["minLength"]) == ("appUid", "path", 1)
    assert op["security"] == [{"APIKeyHeader": []}]


def test_response_codes_and_titles_match_openapi() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "x-api-key"
    responses = openapi_operation()["responses"]
    assert {int(c) for c in responses} == {201} | (set(ERROR_TITLES) - SIMULATOR_ONLY_CODES)
    for code, title in ERROR_TITLES.items():
        if code not in SIMULATOR_ONLY_CODES:
            description = " ".join(responses[str(code)]["description"].split())
            assert description.startswith(title), code
    success = responses["201"]["content"]["application/json"]["schema"]["properties"]
    assert set(success) == {"threadUid", "humanUid", "agentUid"}


async def test_every_documented_status_is_reachable(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    seen = {
        (await client.post(PATH, json=BODY, headers=KEY)).status_code,
        (await client.post(PATH, content=b"{", headers=KEY)).status_code,
        (await client.post(PATH, json=BODY)).status_code,
        (await client.post(PATH, json=BODY, headers={"x-api-key": "nope"})).status_code,
        (await client.post(PATH, json=body(agentUid="ghost"), headers=KEY)).status_code,
        (await client.post(PATH, json=body(message=...), headers=KEY)).status_code,
    }
    for status in (502, 503, 504):
        sim.set_faults(FaultSpec(**{f"error_rate_{status}": 1.0}))
        seen.add((await client.post(PATH, json=BODY, headers=KEY)).status_code)
    sim.set_behavior(BehaviorSpec(rate_limit_per_s=0.01, rate_limit_burst=1))
    seen.add((await client.post(PATH, json=BODY, headers=KEY)).status_code)
    seen.add((await client.post(PATH, json=BODY, headers=KEY)).status_code)
    documented = {int(code) for code in openapi_operation()["responses"]}
    assert seen == documented | SIMULATOR_ONLY_CODES
    counts = sim.store.response_counts()
    assert set(counts) == seen and counts[201] == 2


# -- createThread over HTTP ------------------------------------------------------------------


async def test_201_creates_and_records_a_thread(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    headers = {**KEY, "x-event-id": "evt-1", "x-correlation-id": "corr-1"}
    r = await client.post(PATH, json=BODY, headers=headers)
    assert r.status_code == 201
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert set(data) == {"threadUid", "humanUid", "agentUid"}
    assert data["threadUid"].startswith("th_") and data["agentUid"] == "agent-orders"
    assert data["humanUid"] == resolve_human_uid("demo-app", "externalUserId", "u-1")
    (thread,) = sim.store.all()
    assert (thread.thread_uid, thread.human_uid) == (data["threadUid"], data["humanUid"])
    assert (thread.event_id, thread.correlation_id) == ("evt-1", "corr-1")
    assert (thread.message_type, thread.message) == ("user", "hi")
    assert (thread.identifier_field, thread.identifier_value) == ("externalUserId", "u-1")
    assert thread.answered and thread.app_uid == "demo-app"


async def test_human_uid_is_deterministic_per_user(client: httpx.AsyncClient) -> None:
    async def human(path: str, key: str, **changes: Any) -> str:
        r = await client.post(path, json=body(**changes), headers={"x-api-key": key})
        assert r.status_code == 201, r.text
        uid: str = r.json()["humanUid"]
        return uid

    first = await human(PATH, "demo-key")
    assert await human(PATH, "demo-key", messageType="system") == first
    assert await human(PATH, "demo-key", externalUserId="u-2") != first
    other_app = "/api/v1/appuid/open-app/threads"
    assert await human(other_app, "open-key") != first
    email = await human(PATH, "demo-key", externalUserId=..., sdkUserEmail="a@b.example")
    assert email.startswith("hu_") and email != first
    assert await human(PATH, "demo-key", externalUserId=..., humanUid="h-42") == "h-42"


async def test_thread_uids_are_unique(client: httpx.AsyncClient) -> None:
    uids = {
        (await client.post(PATH, json=BODY, headers=KEY)).json()["threadUid"] for _ in range(20)
    }
    assert len(uids) == 20


async def test_seeded_thread_uids_repeat_after_reset(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    first = (await client.post(PATH, json=BODY, headers=KEY)).json()["threadUid"]
    sim.reset()
    assert (await client.post(PATH, json=BODY, headers=KEY)).json()["threadUid"] == first


async def test_composite_agent_uid(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    r = await client.post(PATH, json=body(agentUid="agent-orders::sess-9"), headers=KEY)
    assert r.status_code == 201 and r.json()["agentUid"] == "agent-orders::sess-9"
    assert sim.store.all()[0].agent_uid == "agent-orders::sess-9"
    r = await client.post(PATH, json=body(agentUid="agent-ghost::sess-9"), headers=KEY)
    assert r.status_code == 404


async def test_401_without_api_key(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"x-api-key": ""}):
        r = await client.post(PATH, json=BODY, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "Unauthorized"


async def test_403_when_key_does_not_match_app(client: httpx.AsyncClient) -> None:
    for path, key in ((PATH, "open-key"), ("/api/v1/appuid/no-such-app/threads", "demo-key")):
        r = await client.post(path, json=BODY, headers={"x-api-key": key})
        assert r.status_code == 403
        assert r.json() == {
            "error": "Forbidden - API key does not match appUid",
            "detail": "API key does not match appUid",
        }


async def test_auth_is_checked_before_the_body(client: httpx.AsyncClient) -> None:
    assert (await client.post(PATH, content=b"not json")).status_code == 401
    bad_key = {"x-api-key": "nope"}
    assert (await client.post(PATH, content=b"{", headers=bad_key)).status_code == 403


@pytest.mark.parametrize(
    "content", [b"", b"{", b"not json", b"[1, 2]", b'"text"', b"42", b"null", b"\xff\xfe"]
)
async def test_400_when_body_is_not_a_json_object(
    client: httpx.AsyncClient, content: bytes
) -> None:
    r = await client.post(
        PATH, content=content, headers={**KEY, "content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"] == "Bad Request"


LONG = "x" * 101
INVALID_BODIES: list[tuple[dict[str, Any], str]] = [
    (body(agentUid=...), "agentUid"),
    (body(message=...), "message"),
    (body(agentUid=""), "agentUid"),
    (body(agentUid="agent-orders::"), "agentUid"),
    (body(agentUid="::sess"), "agentUid"),
    (body(agentUid=7), "agentUid"),
    (body(message=""), "message"),
    (body(message="  \n"), "message"),
    (body(message=None), "message"),
    (body(message=["hi"]), "message"),
    (body(messageType="assistant"), "messageType"),
    (body(messageType="USER"), "messageType"),
    (body(messageType=1), "messageType"),
    (body(externalUserId=LONG), "externalUserId"),
    (body(externalUserId="has space"), "externalUserId"),
    (body(externalUserId="u-1\n"), "externalUserId"),
    (body(externalUserId="ü"), "externalUserId"),
    (body(externalUserId=""), "externalUserId"),
    (body(externalUserId=12), "externalUserId"),
    (body(externalUserId=..., sdkUserEmail=LONG + "@x.example"), "sdkUserEmail"),
    (body(externalUserId=..., realEmailAddress=LONG + "@x.example"), "realEmailAddress"),
    (body(externalUserId=..., humanUid=True), "humanUid"),
    (body(externalUserId=..., humanUid=""), "humanUid"),
    (body(externalUserId=...), rules.IDENTITY_FIELD),
    (body(humanUid="h-1"), rules.IDENTITY_FIELD),
    (body(sdkUserEmail="a@b.example", realEmailAddress="a@b.example"), rules.IDENTITY_FIELD),
]


@pytest.mark.parametrize(("payload", "field"), INVALID_BODIES)
async def test_422_for_each_validation_rule(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient, payload: dict[str, Any], field: str
) -> None:
    r = await client.post(PATH, json=payload, headers=KEY)
    assert r.status_code == 422, r.text
    data = r.json()
    assert data["error"] == "Validation error"
    assert field in {error["field"] for error in data["detail"]}
    assert len(sim.store) == 0


async def test_422_lists_every_problem(client: httpx.AsyncClient) -> None:
    r = await client.post(PATH, json={"messageType": "x", "externalUserId": LONG}, headers=KEY)
    fields = {e["field"] for e in r.json()["detail"]}
    assert fields == {"agentUid", "message", "messageType", "externalUserId"}


@pytest.mark.parametrize(
    "payload",
    [
        body(externalUserId="A" * 100),
        body(externalUserId="Az09_-"),
        body(externalUserId=..., sdkUserEmail="s" * 90 + "@x.example"),
        body(externalUserId=..., realEmailAddress="r@x.example"),
        body(externalUserId=..., humanUid="h" * 300),
        body(messageType="system"),
        body(unknownField={"ignored": True}),
    ],
)
async def test_valid_edge_cases_are_accepted(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    r = await client.post(PATH, json=payload, headers=KEY)
    assert r.status_code == 201, r.text


async def test_404_agent_not_found_after_validation(client: httpx.AsyncClient) -> None:
    r = await client.post(PATH, json=body(agentUid="agent-ghost"), headers=KEY)
    assert r.status_code == 404
    assert r.json()["error"] == "Agent not found"
    r = await client.post(PATH, json=body(agentUid="agent-ghost", message=""), headers=KEY)
    assert r.status_code == 422


async def test_app_without_agent_list_accepts_any_agent(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/v1/appuid/open-app/threads",
        json=body(agentUid="anything"),
        headers={"x-api-key": "open-key"},
    )
    assert r.status_code == 201


async def test_429_with_retry_after(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_rate_limit(0.5, burst=2)
    assert [(await client.post(PATH, json=BODY, headers=KEY)).status_code for _ in range(2)] == [
        201,
        201,
    ]
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"] == "Too Many Requests"
    sim.set_rate_limit(None)
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


async def test_rejected_requests_spend_no_token(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_rate_limit(0.01, burst=1)
    assert (await client.post(PATH, json=body(message=...), headers=KEY)).status_code == 422
    assert (await client.post(PATH, json=body(agentUid="x"), headers=KEY)).status_code == 404
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 429


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_injected_errors(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient, status: int
) -> None:
    sim.set_faults(FaultSpec(**{f"error_rate_{status}": 1.0}))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert r.status_code == status
    assert r.json()["error"] == ERROR_TITLES[status]
    assert "retry-after" not in r.headers
    assert len(sim.store) == 0 and sim.store.response_counts() == {status: 1}


async def test_injected_503_can_carry_retry_after(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_faults(FaultSpec(error_rate_503=1.0, retry_after_s=3))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert (r.status_code, r.headers["retry-after"]) == (503, "3")


async def test_timeout_creates_thread_but_never_answers(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_faults(FaultSpec(timeout_rate=1.0, hang_s=30))
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(PATH, json=BODY, headers={**KEY, "x-event-id": "e-9"}, timeout=0.3)
    assert time.monotonic() - started < 5
    (thread,) = sim.store.by_event_id("e-9")
    assert not thread.answered
    assert sim.store.timeouts == 1
    assert sim.store.count_by_event_id() == {"e-9": 1}


async def test_timeout_without_thread(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_faults(FaultSpec(timeout_rate=1.0, hang_s=30, timeout_creates_thread=False))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(PATH, json=BODY, headers=KEY, timeout=0.2)
    assert len(sim.store) == 0 and sim.store.timeouts == 1


async def test_hang_ends_with_504(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_faults(FaultSpec(timeout_rate=1.0, hang_s=0.2))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert r.status_code == 504
    assert sim.store.summary()["unansweredThreads"] == 1


async def test_stop_wakes_a_hanging_request() -> None:
    settings = SimulatorSettings(faults=FaultSpec(timeout_rate=1.0, hang_s=300))
    simulator = ThreadsApiSimulator(settings)
    await simulator.start()
    async with httpx.AsyncClient(base_url=simulator.base_url) as c:
        request = asyncio.ensure_future(c.post(PATH, json=BODY, headers=KEY, timeout=10))
        while simulator.store.timeouts == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await simulator.stop()
        assert time.monotonic() - started < 3
        assert (await request).status_code == 504


async def test_latency_is_applied(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_latency(LatencySpec(distribution="fixed", median_ms=200))
    started = time.monotonic()
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201
    assert time.monotonic() - started >= 0.19


# -- admin endpoints ------------------------------------------------------------------------


async def test_admin_threads_and_stats(client: httpx.AsyncClient) -> None:
    for event_id in ("a", "a", "b"):
        await client.post(PATH, json=BODY, headers={**KEY, "x-event-id": event_id})
    await client.post(PATH, json=BODY, headers=KEY)
    await client.post(PATH, json=BODY)
    threads = (await client.get("/_simulator/threads")).json()
    assert [t["eventId"] for t in threads] == ["a", "a", "b", None]
    only_a = (await client.get("/_simulator/threads", params={"eventId": "a"})).json()
    assert len(only_a) == 2 and only_a[0]["agentUid"] == "agent-orders"
    assert set(only_a[0]) >= {"threadUid", "humanUid", "messageType", "createdAt", "answered"}
    stats = (await client.get("/_simulator/stats")).json()
    assert stats["threads"] == 4
    assert stats["responses"] == {"201": 4, "401": 1}
    assert stats["eventIds"] == {"distinct": 2, "withoutEventId": 1, "duplicated": {"a": 2}}


async def test_admin_put_faults(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    spec = {"faults": {"error_rate_503": 1.0, "retry_after_s": 1}, "rate_limit_per_s": 100}
    r = await client.put("/_simulator/faults", json=spec)
    assert r.status_code == 200
    assert r.json()["faults"]["error_rate_503"] == 1.0
    assert sim.behavior.rate_limit_per_s == 100
    assert (await client.get("/_simulator/faults")).json() == r.json()
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 503
    assert (await client.put("/_simulator/faults", json={})).status_code == 200
    assert sim.behavior == BehaviorSpec()
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


@pytest.mark.parametrize(
    "payload",
    [
        {"faults": {"error_rate_503": 1.5}},
        {"faults": {"error_rate_502": 0.6, "timeout_rate": 0.6}},
        {"faults": {"hang_s": 0}},
        {"latency": {"distribution": "uniform"}},
        {"latency": {"distribution": "gaussian"}},
        {"rate_limit_per_s": -1},
        {"faults": {"typo_rate": 0.1}},
        [],
    ],
)
async def test_admin_put_faults_rejects_bad_input(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient, payload: Any
) -> None:
    r = await client.put("/_simulator/faults", json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert sim.behavior == BehaviorSpec()


async def test_admin_put_faults_bad_json(client: httpx.AsyncClient) -> None:
    assert (await client.put("/_simulator/faults", content=b"{")).status_code == 400


async def test_admin_reset_health_openapi(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    await client.post(PATH, json=BODY, headers=KEY)
    assert (await client.post("/_simulator/reset")).json() == {"status": "reset"}
    assert len(sim.store) == 0 and sim.store.response_counts() == {}
    assert (await client.get("/_simulator/health")).json() == {"status": "ok"}
    r = await client.get("/_simulator/openapi.yaml")
    assert r.status_code == 200 and r.content == OPENAPI.read_bytes()


async def test_unknown_routes_answer_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "Not Found"
    r = await client.get(PATH, headers=KEY)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = await client.post("/api/v1/appuid//threads", json=BODY, headers=KEY)
    assert r.status_code == 404
    # api.base_url with one segment too many: a 404 with the API's JSON error body
    r = await client.post(f"/api/v1{PATH}", json=BODY, headers=KEY)
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "detail": None}


# -- lifecycle ------------------------------------------------------------------------------


async def test_start_and_stop_are_idempotent() -> None:
    simulator = ThreadsApiSimulator()
    with pytest.raises(RuntimeError):
        _ = simulator.base_url
    await simulator.start()
    url = simulator.base_url
    await simulator.start()
    assert simulator.base_url == url and re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    await simulator.stop()
    await simulator.stop()
    assert not simulator.running
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as c:
            await c.get(f"{url}/_simulator/health")


def test_run_in_thread() -> None:
    with run_in_thread(SimulatorSettings(seed=1)) as sim, httpx.Client(base_url=sim.base_url) as c:
        assert c.post(PATH, json=BODY, headers={**KEY, "x-event-id": "t"}).status_code == 201
        assert sim.store.count_by_event_id() == {"t": 1}
        sim.set_faults(FaultSpec(error_rate_502=1.0))
        assert c.post(PATH, json=BODY, headers=KEY).status_code == 502
        sim.set_rate_limit(0.01, burst=1)
        sim.set_faults(FaultSpec())
        assert [c.post(PATH, json=BODY, headers=KEY).status_code for _ in range(2)] == [201, 429]
        sim.reset()
        assert len(sim.store) == 0
        url = sim.base_url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/_simulator/health")


# -- CLI ------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.simulator", "--port", "0", "--seed", "3"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the simulator did not log its URL"
        assert httpx.post(f"{url}{PATH}", json=BODY, headers=KEY).status_code == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_cli_flags_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(
        "port: 8123\nseed: 5\nfaults: {error_rate_502: 0.1, hang_s: 9}\n"
        "apps: {acme: {api_key: k1, agents: [a1]}}\n"
    )
    args = build_parser().parse_args(
        ["--config", str(config), "--error-rate-503", "0.2", "--latency", "lognormal",
         "--latency-ms", "800", "--latency-p99-ms", "5000", "--rate-limit-per-s", "50",
         "--no-timeout-creates-thread", "--port", "0"]
    )  # fmt: skip
    s = settings_from_args(args)
    assert (s.port, s.seed, s.rate_limit_per_s) == (0, 5, 50)
    assert (s.faults.error_rate_502, s.faults.error_rate_503, s.faults.hang_s) == (0.1, 0.2, 9)
    assert s.faults.timeout_creates_thread is False
    assert (s.latency.distribution, s.latency.median_ms, s.latency.p99_ms) == (
        "lognormal",
        800,
        5000,
    )
    assert list(s.apps) == ["acme"] and s.apps["acme"].agents == ["a1"]
    s = settings_from_args(build_parser().parse_args(["--app-uid", "x", "--agent", "a"]))
    assert s.apps["x"].api_key.get_secret_value() == "demo-key" and s.apps["x"].agents == ["a"]
    assert "k1" not in repr(SimulatorSettings.from_yaml(config))


def test_cli_rejects_bad_settings(tmp_path: Path) -> None:
    assert main(["--error-rate-503", "2"]) == 2
    assert main(["--latency", "uniform"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["--config", str(tmp_path / "list.yaml")]) == 2


def test_cli_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--port", str(taken.getsockname()[1])]) == 1


# -- pure parts: fault model, latency, token bucket, store, settings ------------------------


def test_fault_model_is_reproducible_and_proportional() -> None:
    spec = FaultSpec(error_rate_502=0.1, error_rate_503=0.2, error_rate_504=0.05, timeout_rate=0.15)
    model_a, model_b = FaultModel(spec, random.Random(42)), FaultModel(spec, random.Random(42))
    seq_a = [model_a.decide() for _ in range(20_000)]
    assert seq_a == [model_b.decide() for _ in range(20_000)]
    share = {fault: seq_a.count(fault) / len(seq_a) for fault in Fault}
    expected = {
        Fault.BAD_GATEWAY: 0.1,
        Fault.UNAVAILABLE: 0.2,
        Fault.GATEWAY_TIMEOUT: 0.05,
        Fault.TIMEOUT: 0.15,
        Fault.NONE: 0.5,
    }
    for fault, p in expected.items():
        assert share[fault] == pytest.approx(p, abs=0.015), fault
    assert Fault.UNAVAILABLE.status == 503 and Fault.TIMEOUT.status is None


def test_fault_model_extremes() -> None:
    rng = random.Random(0)
    assert {FaultModel(FaultSpec(), rng).decide() for _ in range(1000)} == {Fault.NONE}
    certain = FaultModel(FaultSpec(timeout_rate=1.0), rng)
    assert {certain.decide() for _ in range(1000)} == {Fault.TIMEOUT}


def test_latency_distributions() -> None:
    def samples(spec: LatencySpec, n: int = 20_000) -> list[float]:
        sampler = LatencySampler(spec, random.Random(1))
        return [sampler.sample_ms() for _ in range(n)]

    assert set(samples(LatencySpec(median_ms=25), 10)) == {25}
    uniform = samples(LatencySpec(distribution="uniform", min_ms=10, max_ms=20))
    assert min(uniform) >= 10 and max(uniform) <= 20
    expo = samples(LatencySpec(distribution="exponential", median_ms=100))
    assert statistics.median(expo) == pytest.approx(100, rel=0.05)
    logn = samples(LatencySpec(distribution="lognormal", median_ms=1000, p99_ms=8000))
    assert statistics.median(logn) == pytest.approx(1000, rel=0.05)
    assert statistics.quantiles(logn, n=100)[98] == pytest.approx(8000, rel=0.1)
    capped = samples(LatencySpec(distribution="lognormal", median_ms=100, min_ms=50, max_ms=150))
    assert min(capped) == 50 and max(capped) == 150
    assert LatencySampler(LatencySpec(median_ms=250), random.Random()).sample_s() == 0.25


def test_token_bucket_with_fake_clock() -> None:
    now = [100.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_acquire() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.try_acquire() == 0.0
    now[0] += 60
    assert [bucket.try_acquire() for _ in range(4)][-1] == pytest.approx(0.5)
    assert [TokenBucket.retry_after_s(w) for w in (0.01, 1.0, 1.2)] == [1, 1, 2]
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_store_helpers() -> None:
    store = ThreadStore()

    def add(event_id: str | None) -> None:
        store.add(
            CreatedThread(
                "th", "app", "ag", "hu", "system", "m", "humanUid", "hu", event_id, None,
                datetime.now(UTC),
            )
        )  # fmt: skip

    for event_id in ("x", "x", "y", None):
        add(event_id)
    assert store.count_by_event_id() == {"x": 2, "y": 1}
    assert len(store.by_event_id("x")) == 2 and len(store.all()) == 4
    store.record_response(201)
    store.clear()
    assert len(store) == 0 and store.response_counts() == {} and store.timeouts == 0


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        LatencySpec(distribution="lognormal", median_ms=100, p99_ms=50)
    with pytest.raises(ValidationError):
        LatencySpec(min_ms=10, max_ms=5)
    with pytest.raises(ValidationError):
        SimulatorSettings(apps={})
    with pytest.raises(ValidationError):
        SimulatorSettings(apps={"": AppSpec(api_key=SecretStr("k"))})
    assert BehaviorSpec(rate_limit_per_s=2.5).burst == 3
    default = SimulatorSettings()
    assert default.apps["demo-app"].agents == [
        "agent-orders",
        "agent-onboarding",
        "agent-compliance",
        "agent-support",
    ]
    assert "demo-key" not in repr(default)


async def test_changing_faults_keeps_the_rate_limit_bucket(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_rate_limit(0.01, burst=1)
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201
    sim.set_faults(FaultSpec(error_rate_502=0.0))
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 429
    sim.reset()
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


# -- hostile modes ---------------------------------------------------------------------------


async def test_hostile_retry_after_forms(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_hostile(HostileSpec(mode="retry_after", count=1))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert (r.status_code, r.headers["retry-after"]) == (429, "999999")
    assert r.json()["error"] == ERROR_TITLES[429]
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201  # count spent

    sim.set_hostile(HostileSpec(mode="retry_after_date", retry_after_s=86_400))
    r = await client.post(PATH, json=BODY, headers=KEY)
    when = email.utils.parsedate_to_datetime(r.headers["retry-after"])
    assert r.status_code == 429
    assert 86_000 < (when - datetime.now(UTC)).total_seconds() <= 86_400


async def test_hostile_modes_come_after_the_checks(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_hostile(HostileSpec(mode="retry_after", count=1))
    assert (await client.post(PATH, json=BODY, headers={"x-api-key": "x"})).status_code == 403
    assert (await client.post(PATH, json=body(message=...), headers=KEY)).status_code == 422
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 429


async def test_hostile_trickle_body_creates_the_thread_and_sends_it_slowly(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_hostile(HostileSpec(mode="trickle_body", trickle_interval_s=0.2, count=1))
    # a per-read timeout never fires (a byte comes every 0.2 s): only a total one does
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await client.post(PATH, json=BODY, headers={**KEY, "x-event-id": "e-t"}, timeout=0.5)
    assert sim.store.count_by_event_id() == {"e-t": 1}


async def test_hostile_trickle_body_is_a_whole_201_in_the_end(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_hostile(HostileSpec(mode="trickle_body", trickle_interval_s=0.001))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert r.status_code == 201 and r.json()["threadUid"].startswith("th_")


async def test_hostile_huge_body(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_hostile(HostileSpec(mode="huge_body", body_bytes=3_000_000))
    r = await client.post(PATH, json=BODY, headers=KEY)
    assert r.status_code == 201
    assert len(r.content) == 3_000_000
    assert r.json()["threadUid"] == sim.store.all()[0].thread_uid


async def test_hostile_slow_headers(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_hostile(HostileSpec(mode="slow_headers", headers_delay_s=30, count=1))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(PATH, json=BODY, headers=KEY, timeout=0.3)
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


async def test_hostile_reset(sim: ThreadsApiSimulator, client: httpx.AsyncClient) -> None:
    sim.set_hostile(HostileSpec(mode="reset", count=1))
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(PATH, json=BODY, headers=KEY)
    assert len(sim.store) == 0
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


async def test_hostile_black_hole_answers_nothing_not_even_to_a_wrong_key(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.set_hostile(HostileSpec(mode="black_hole", count=2))
    with pytest.raises(httpx.ReadTimeout):
        await client.post(PATH, json=BODY, headers=KEY, timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        await client.post(PATH, json=BODY, headers={"x-api-key": "wrong"}, timeout=0.3)
    assert len(sim.store) == 0
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 201


async def test_hostile_mode_from_the_admin_api(
    sim: ThreadsApiSimulator, client: httpx.AsyncClient
) -> None:
    r = await client.put("/_simulator/faults", json={"hostile": {"mode": "retry_after"}})
    assert r.status_code == 200 and r.json()["hostile"]["mode"] == "retry_after"
    assert (await client.post(PATH, json=BODY, headers=KEY)).status_code == 429
    bad = await client.put("/_simulator/faults", json={"hostile": {"mode": "explode"}})
    assert bad.status_code == 422


def test_hostile_and_tls_cli_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--hostile",
            "huge_body",
            "--hostile-count",
            "3",
            "--body-bytes",
            "1000",
            "--tls-self-signed",
            str(tmp_path / "tls"),
        ]
    )
    settings = settings_from_args(args)
    assert settings.hostile == HostileSpec(mode="huge_body", count=3, body_bytes=1000)
    assert settings.tls_cert_file == tmp_path / "tls" / "server.pem"
    assert (tmp_path / "tls" / "ca.pem").is_file()


async def test_untrusted_tls_unless_the_ca_is_given(tmp_path: Path) -> None:
    files = make_private_ca(tmp_path)
    settings = SimulatorSettings(tls_cert_file=files.cert_file, tls_key_file=files.key_file)
    async with ThreadsApiSimulator(settings) as simulator:
        assert simulator.base_url.startswith("https://")
        async with httpx.AsyncClient(base_url=simulator.base_url) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.post(PATH, json=BODY, headers=KEY)
        ctx = ssl.create_default_context(cafile=str(files.ca_file))
        async with httpx.AsyncClient(base_url=simulator.base_url, verify=ctx) as trusting:
            assert (await trusting.post(PATH, json=BODY, headers=KEY)).status_code == 201
