"""Tracing end to end: events with a W3C ``traceparent`` through a real broker, the Threads
API simulator and a real Jaeger; each event's whole trace is read back from Jaeger's query
API, and the propagated ``traceparent`` headers are checked against the spans found."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.tracing import TRACING
from tests.harness import (
    Names,
    event,
    make_settings,
    produce,
    read_all,
    running,
    wait_until_committed,
)
from tests.jaeger import Jaeger, running_jaeger

pytestmark = pytest.mark.integration
CALL = "POST /api/v1/appuid/{appUid}/threads"


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    with running_jaeger(tmp_path_factory.mktemp("jaeger")) as running:
        yield running


@pytest.fixture
async def sim() -> AsyncIterator[ThreadsApiSimulator]:
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as simulator:
        yield simulator


def traceparent() -> tuple[str, str, bytes]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


def by_operation(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["operationName"]: s for s in spans}


def parent_of(span: dict[str, Any]) -> str | None:
    refs = [r for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
    return refs[0]["spanID"] if refs else None


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def header(record: Any, name: str) -> list[bytes]:
    return [v for k, v in record.headers if k == name]


async def test_each_event_has_its_whole_trace_in_jaeger(
    kafka_bootstrap: str,
    jaeger: Jaeger,
    sim: ThreadsApiSimulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", jaeger.otlp_http)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    names = Names.fresh("trace")
    service = f"tc-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka_bootstrap, sim.base_url, names,
                             tracing={"enabled": True, "service_name": service})  # fmt: skip
    good = {f"tr-{i}": traceparent() for i in range(3)}
    bad_trace, bad_parent, bad_header = traceparent()
    async with running(settings) as connector:
        assert TRACING.on
        for event_id, (_, _, value) in good.items():
            trace_headers = [("traceparent", value), ("tracestate", b"vendor=1")]
            await produce(kafka_bootstrap, names.input, [(b"u-1", event(event_id))],
                          headers=trace_headers)  # fmt: skip
        await produce(kafka_bootstrap, names.input, [(b"u-2", b"{not json")],
                      headers=[("traceparent", bad_header)])  # fmt: skip
        await produce(kafka_bootstrap, names.input, [(b"u-3", event("untraced"))])
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
        assert connector.pipeline is not None
    assert not TRACING.on  # stopped with the connector, the last spans flushed

    results = {
        orjson.loads(r.value)["eventId"]: r for r in await read_all(kafka_bootstrap, names.results)
    }
    threads = {t.event_id: t for t in sim.store.all()}
    for event_id, (trace_id, producer_span, _) in good.items():
        spans = jaeger.wait_for(trace_id, {f"process {names.input}", "route", CALL,
                                           f"publish {names.results}"})  # fmt: skip
        ops = by_operation(spans)
        process = ops[f"process {names.input}"]
        assert parent_of(process) == producer_span  # continued from the producer's span
        assert tags(process)["span.kind"] == "consumer"
        assert tags(process)["threads_connector.outcome"] == "result"
        for child in ("route", CALL, f"publish {names.results}"):
            assert parent_of(ops[child]) == process["spanID"], child
        call = ops[CALL]
        assert tags(call)["span.kind"] == "client"
        assert tags(call)["http.response.status_code"] == 201
        publish = ops[f"publish {names.results}"]
        assert tags(publish)["span.kind"] == "producer"
        # the API request and the result record carry the trace on
        assert threads[event_id].traceparent == f"00-{trace_id}-{call['spanID']}-01"
        result = results[event_id]
        assert header(result, "traceparent") == [f"00-{trace_id}-{publish['spanID']}-01".encode()]
        assert header(result, "tracestate") == [b"vendor=1"]
        process_ids = {s["processID"] for s in spans}
        assert len(process_ids) == 1

    # the dead letter: the event's span an error, its record continuing the same trace
    spans = jaeger.wait_for(bad_trace, {f"process {names.input}", f"publish {names.dead}"})
    ops = by_operation(spans)
    process = ops[f"process {names.input}"]
    assert parent_of(process) == bad_parent
    assert tags(process)["error"] is True and tags(process)["error.type"] == "invalid_json"
    publish = ops[f"publish {names.dead}"]
    (dead,) = await read_all(kafka_bootstrap, names.dead)
    assert header(dead, "traceparent") == [f"00-{bad_trace}-{publish['spanID']}-01".encode()]
    # its log line carries the trace id
    (line,) = [r for r in caplog.records if r.getMessage() == "event dead-lettered"]
    assert getattr(line, "trace_id", None) == bad_trace

    # an event without a traceparent starts a trace of its own, propagated the same way
    untraced = results["untraced"]
    (value,) = header(untraced, "traceparent")
    new_trace = value.decode().split("-")[1]
    assert new_trace not in {t for t, _, _ in good.values()}
    spans = jaeger.wait_for(new_trace, {f"process {names.input}", CALL})
    assert parent_of(by_operation(spans)[f"process {names.input}"]) is None
    assert threads["untraced"].traceparent is not None
    assert threads["untraced"].traceparent.split("-")[1] == new_trace
