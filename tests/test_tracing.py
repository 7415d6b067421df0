"""connector.tracing without a collector: spans kept in memory (the SDK's own exporter).

Off (the default), nothing is traced and nothing is added to a request or a record; on,
the client span's ``traceparent`` goes out with the request, log lines inside a span carry
its trace id, and a record's trace headers are replaced by the connector's span's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from connector.errors import ConfigError, RetriableApiError
from connector.events import InputRecord, OutRecord
from connector.localkafka.ports import free_ports
from connector.tracing import TRACING, _ExportNoise
from tests.test_threads_client import REQUEST, client, respond, serving

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01".encode()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    TRACING.start("test-service", exporter=exporter)
    try:
        yield exporter
    finally:
        TRACING.shutdown()


async def test_off_by_default_nothing_is_added_to_the_request() -> None:
    assert not TRACING.on
    seen: list[str | None] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request.headers.get("traceparent"))
        return await respond(201, json={"threadUid": "th"})(request)

    async with serving(handler) as base_url, client(base_url) as c:
        await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert seen == [None]


async def test_the_api_call_is_a_client_span_whose_traceparent_is_sent(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[str | None] = []
    status = iter([201, 503])

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request.headers.get("traceparent"))
        code = next(status)
        body = {"threadUid": "th"} if code == 201 else {"error": "down"}
        return await respond(code, json=body)(request)

    record = InputRecord("orders", 2, 41, b"k", b"{}", (("TraceParent", TRACEPARENT),))
    span, token = TRACING.event_span(record, "group-1")
    try:
        async with serving(handler) as base_url, client(base_url) as c:
            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
            with pytest.raises(RetriableApiError):
                await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    finally:
        TRACING.end_event(span, token, "result")
    TRACING.shutdown()  # flush
    finished = spans.get_finished_spans()
    calls = [s for s in finished if s.kind is SpanKind.CLIENT]
    (process,) = [s for s in finished if s.kind is SpanKind.CONSUMER]
    assert process.name == "process orders"
    assert format(process.context.trace_id, "032x") == PARENT_TRACE  # header name any case
    assert process.parent is not None and format(process.parent.span_id, "016x") == PARENT_SPAN
    assert process.attributes is not None
    assert process.attributes["messaging.kafka.offset"] == 41
    assert [s.name for s in calls] == ["POST /api/v1/appuid/{appUid}/threads"] * 2
    assert all(s.parent is not None and s.parent.span_id == process.context.span_id for s in calls)
    for call, header in zip(calls, seen, strict=True):
        assert header == (f"00-{PARENT_TRACE}-{format(call.context.span_id, '016x')}-01")
    assert calls[0].attributes is not None and calls[1].attributes is not None
    assert calls[0].attributes["http.response.status_code"] == 201
    assert calls[1].attributes["http.response.status_code"] == 503
    assert calls[1].status.status_code is StatusCode.ERROR


def test_log_lines_inside_a_span_carry_its_trace_id(caplog: pytest.LogCaptureFixture) -> None:
    spans = InMemorySpanExporter()
    with caplog.at_level(logging.INFO):
        TRACING.start("test-service", exporter=spans)  # after caplog's handler is in place
        try:
            record = InputRecord("orders", 0, 1, None, b"{}", (("traceparent", TRACEPARENT),))
            span, token = TRACING.event_span(record, "g")
            logging.getLogger("connector.pipeline").warning("inside")
            TRACING.end_event(span, token, "dead_letter", "invalid_json")
            logging.getLogger("connector.pipeline").warning("outside")
        finally:
            TRACING.shutdown()
    inside, outside = (r for r in caplog.records if r.getMessage() in ("inside", "outside"))
    assert getattr(inside, "trace_id", None) == PARENT_TRACE
    assert not hasattr(outside, "trace_id")
    (finished,) = spans.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.attributes is not None and finished.attributes["error.type"] == "invalid_json"


def test_a_record_gets_the_connectors_traceparent_instead_of_the_events(
    spans: InMemorySpanExporter,
) -> None:
    original = OutRecord("dlq", b"k", b"v", (("traceparent", TRACEPARENT), ("a", b"1")))
    span = TRACING.publish_span("dlq", "dead_letter")
    out = TRACING.with_trace_headers(original, span)
    TRACING.end_publish([span])
    span_id = format(span.get_span_context().span_id, "016x")
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert out.headers[0] == ("a", b"1") and out.headers[1][0] == "traceparent"
    assert out.headers[1][1].startswith(f"00-{trace_id}-{span_id}-".encode())


def test_otel_sdk_disabled_keeps_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    TRACING.start("test-service", exporter=InMemorySpanExporter())
    assert not TRACING.on


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "max_queue_size must be a positive integer"),
        ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"}, "max_export_batch_size must be less"),
    ],
)
def test_batch_settings_the_sdk_refuses_are_a_configuration_problem(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], words: str
) -> None:
    """A batch size raised for throughput without the queue (4096 > 2048) made the SDK
    raise ValueError from the start: a traceback and exit status 1, in a crash loop. Now
    a ConfigError (``run`` exits with the configuration status, one message)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"tracing: .*{words}"):
        TRACING.start("test-service", exporter=InMemorySpanExporter())
    assert not TRACING.on


def test_a_collector_that_is_down_neither_holds_the_stop_nor_floods_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a bound the stop waited for the exporter's retries (15 s measured), and
    the exporter logged every retry (a line a second for as long as the collector is
    down)."""
    (port,) = free_ports(1)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    caplog.set_level(logging.INFO)
    TRACING.start("test-service")
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            TRACING.end_publish([TRACING.publish_span("t", "result")])
            time.sleep(0.02)
    finally:
        began = time.monotonic()
        TRACING.shutdown()
        took = time.monotonic() - began
    assert took < TRACING.SHUTDOWN_FLUSH_MS / 1000 + 1
    otel = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    kinds = {(r.name, r.levelno) for r in otel}
    assert otel and len(otel) <= 2 * len(kinds), [r.getMessage() for r in otel]
    assert all(r.getMessage().startswith("tracing: ") for r in otel)


def test_export_noise_lets_one_line_of_a_kind_through_per_interval() -> None:
    now = [0.0]
    noise = _ExportNoise(every_s=60, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.x", logging.WARNING, "", 0, msg, None, None)

    first = record("Transient error %s")
    first.args = ("refused",)
    assert noise.filter(first) and first.getMessage() == "tracing: Transient error refused"
    assert not noise.filter(record("Transient error %s"))
    assert noise.filter(record("Failed to export spans batch"))  # another kind
    now[0] = 61
    again = record("Transient error %s")
    assert noise.filter(again)
    assert again.getMessage().endswith("(1 more like it in the last 60s)")
