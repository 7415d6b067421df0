"""OpenTelemetry tracing: a trace per event, continued from the producer's ``traceparent``.

Off by default (``tracing.enabled``). Off, every call site is one attribute check
(``TRACING.on``) and nothing else runs: no span, no context, no header. On, each event
gets::

    process <input topic>     CONSUMER  the event's whole handling; its parent is the
    │                                   W3C ``traceparent``/``tracestate`` of the record's
    │                                   headers when present, else a new trace
    ├── route                 INTERNAL  event -> thread request (templates, validation)
    ├── POST /api/v1/appuid/{appUid}/threads
    │                         CLIENT    one per HTTP attempt (retries are siblings); the
    │                                   request carries its ``traceparent``
    └── publish <topic>       PRODUCER  the result (or dead-letter) record, from its making
                                        to the commit cycle that made it durable; the
                                        record carries its ``traceparent``

The exporter and the sampler are configured the standard way, by the OpenTelemetry
environment variables the SDK reads itself: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``:
the producer's sampling decision is kept), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_SERVICE_NAME`` (else ``tracing.service_name``), ``OTEL_PROPAGATORS``;
``OTEL_SDK_DISABLED=true`` turns tracing off whatever the settings say. Spans leave in
batches (OTLP over HTTP/protobuf) from the SDK's own thread; the provider is flushed when
the connector stops. While tracing is on, log records made inside a span carry its
``trace_id`` and ``span_id``.

One process-wide instance (``TRACING``), started and stopped by the composition root like
the logging configuration.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import Token
from dataclasses import replace
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from connector.errors import ConfigError
from connector.events import Headers, InputRecord, OutRecord

log = logging.getLogger(__name__)
TRACE_HEADERS = ("traceparent", "tracestate")


class _HeaderGetter(Getter[Headers]):
    """Kafka headers (name, bytes) as a carrier; names compared case-insensitively."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        found = [value.decode("latin-1") for name, value in carrier if name.lower() == key]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


class _DictSetter(Setter[MutableMapping[str, str]]):
    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key] = value


_GETTER = _HeaderGetter()
_SETTER = _DictSetter()


class _TraceIds(logging.Filter):
    """Adds ``trace_id`` / ``span_id`` (hex) to records logged inside a recording span."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class _ExportNoise(logging.Filter):
    """For the OpenTelemetry SDK's loggers: with the collector down, the exporter logs each
    retry and each lost batch (a line a second or so, for as long as it is down). One line
    of each kind per ``every_s`` gets through, prefixed ``tracing:``, with the number left
    out since. Tracing never affects readiness: the events are processed all the same."""

    def __init__(self, every_s: float = 60.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._left_out: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg)[:40])
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every_s:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return False
        self._last[kind] = now
        left_out = self._left_out.pop(kind, 0)
        record.msg = f"tracing: {record.getMessage()}"
        record.args = None
        if left_out:
            record.msg += f" ({left_out} more like it in the last {self._every_s:g}s)"
        return True


class Tracing:
    """The tracer provider, the spans of an event's handling, header propagation."""

    SHUTDOWN_FLUSH_MS = 3_000  # at stop, spans still batched get this long to leave

    def __init__(self) -> None:
        self.on = False
        self._provider: Any = None
        self._exporter: Any = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        self._log_filter = _TraceIds()
        self._noise = _ExportNoise()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, service_name: str, *, exporter: Any = None) -> None:
        """Build the provider (OTLP/HTTP exporter from the environment unless ``exporter``
        is given: tests), and start tracing. Idempotent while on."""
        if self.on:
            return
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            log.info("tracing is enabled in the settings but OTEL_SDK_DISABLED=true: off")
            return
        # imported here: with tracing off (the default) the SDK is never loaded
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.environment_variables import OTEL_SERVICE_NAME
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from connector import __version__

        attributes = {"service.version": __version__}
        if not os.environ.get(OTEL_SERVICE_NAME):
            attributes["service.name"] = service_name
        provider = TracerProvider(
            resource=Resource.create(attributes), shutdown_on_exit=False
        )  # the sampler: OTEL_TRACES_SAMPLER
        try:
            batches = BatchSpanProcessor(exporter or OTLPSpanExporter())
        except ValueError as exc:  # OTEL_BSP_* the SDK refuses: a message, not a traceback
            raise ConfigError(
                f"tracing: the OpenTelemetry environment is not usable: {exc} "
                "(OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, ...)"
            ) from None
        self._exporter = batches.span_exporter
        provider.add_span_processor(batches)
        self._provider = provider
        self._tracer = provider.get_tracer("threads-connector", __version__)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)
        for otel_logger in _otel_loggers():
            otel_logger.addFilter(self._noise)
        self.on = True
        log.info("tracing on: spans exported with OTLP (OTEL_EXPORTER_OTLP_* settings)")

    def shutdown(self) -> None:
        """Flush the spans still batched and stop (idempotent)."""
        if not self.on:
            return
        self.on = False
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)
        provider, self._provider = self._provider, None
        self._exporter = None
        self._tracer = trace.NoOpTracer()
        if provider is None:
            return
        # bounded: with the collector down, the exporter's retries held the stop for their
        # whole timeout (15 s measured); what cannot leave in time is dropped (the SDK's
        # worker is a daemon thread). The noise filter stays on: the closer may still log.
        closer = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
        closer.start()  # flushes what is batched, then stops (its flush ignores timeouts)
        closer.join(self.SHUTDOWN_FLUSH_MS / 1000)

    # -- spans (call only when ``on``) ----------------------------------------------------

    def event_span(self, record: InputRecord, group_id: str) -> tuple[Span, Token[Context]]:
        """The event's span, started and made current in this task; returns it and the
        token ``end_event`` needs. Its parent is the record's ``traceparent``, if any."""
        parent = get_global_textmap().extract(record.headers, getter=_GETTER)
        span = self._tracer.start_span(
            f"process {record.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "messaging.consumer.group.name": group_id,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def end_event(self, span: Span, token: Token[Context], outcome: str, code: str = "") -> None:
        """End the event's span with its outcome (``result``, ``dead_letter`` with its code:
        an error, ``duplicate``, ``abandoned``: left for the partition's next owner)."""
        span.set_attribute("threads_connector.outcome", outcome)
        if outcome == "dead_letter":
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {code}"))
        span.end()
        otel_context.detach(token)

    @contextmanager
    def span(
        self,
        name: str,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
    ) -> Iterator[Span]:
        """A child of the current span, current inside the block; an exception leaving
        the block is recorded and marks it an error."""
        with self._tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    def publish_span(self, topic: str, kind: str) -> Span:
        """The span of an outcome record (ended by ``end_publish`` after its commit)."""
        return self._tracer.start_span(
            f"publish {topic}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "threads_connector.outcome": kind,
            },
        )

    def end_publish(self, spans: Iterable[Span], error: BaseException | None = None) -> None:
        for span in spans:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"commit cycle failed: {error}"))
            span.end()

    # -- propagation ----------------------------------------------------------------------

    def inject(self, headers: MutableMapping[str, str], span: Span | None = None) -> None:
        """``traceparent`` (and ``tracestate``) of ``span``, else of the current span."""
        context = trace.set_span_in_context(span) if span is not None else None
        get_global_textmap().inject(headers, context=context, setter=_SETTER)

    def with_trace_headers(self, record: OutRecord, span: Span) -> OutRecord:
        """``record`` with ``span``'s ``traceparent``/``tracestate`` instead of any it had
        (a dead letter copies the event's headers: its ``traceparent`` is our span's
        parent, so the copy continues the same trace)."""
        carrier: dict[str, str] = {}
        self.inject(carrier, span)
        if not carrier:
            return record
        kept = tuple((k, v) for k, v in record.headers if k.lower() not in TRACE_HEADERS)
        added = tuple((k, v.encode("ascii", "replace")) for k, v in carrier.items())
        return replace(record, headers=kept + added)


def _otel_loggers() -> list[logging.Logger]:
    """The OpenTelemetry SDK's loggers (module-level, created when it is imported)."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("opentelemetry")]
    return [logging.getLogger(n) for n in names]


TRACING = Tracing()
