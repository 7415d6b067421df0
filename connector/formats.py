"""Input records to events, by their topic's format (``input.topics``; docs/formats.md).

- ``json`` (the default): the value is the event's JSON. ``Parser.parse``, synchronous:
  no per-format cost on this path (one set look-up per record).
- ``avro``, ``protobuf``, ``json_schema``: the Confluent wire format, a magic byte 0, the
  schema id (4 bytes, big-endian), then the payload (Protobuf: message indexes first). The
  schema comes from the registry (``connector.registry``), once per id; the payload is
  decoded (``connector.decoders``) to the dict the JSON path would give.
- ``cloudevents: true``: a record in CloudEvents binary or structured mode is read as
  one (``connector.cloudevents``), its data in the topic's format; other records as
  the format alone.

Every decode failure that is the record's is ``EventRejected`` (stage ``parse``, code
``schema_error``, the schema id in the reason, or ``invalid_cloudevent``); the registry
being unreachable is not: the record waits for it (``SchemaRegistry.schema``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from connector import cloudevents
from connector.config import REGISTRY_FORMATS, ConnectorSettings, TopicFormat, header_value_problem
from connector.decoders import Decoder, SchemaMismatch, build_decoder
from connector.errors import EventRejected, Stage
from connector.events import Event, InputRecord, event_from_body, parse_event
from connector.registry import SchemaNotFound, SchemaRegistry

MAGIC_BYTE = 0
WIRE_HEADER_BYTES = 5
CORRELATION_ID_MAX = 200  # characters of a correlation id taken from a header
SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json_schema": "JSON"}


def schema_error(reason: str) -> EventRejected:
    return EventRejected(Stage.PARSE, reason, code="schema_error")


class Parser:
    """Turns records into events; holds the decoders built per schema id."""

    def __init__(self, settings: ConnectorSettings, registry: SchemaRegistry | None = None) -> None:
        self._dedup = settings.dedup
        self._type_field = settings.event_type_field
        self._correlation_header = settings.input.correlation_id_header
        self._formats: dict[str, TopicFormat] = {
            topic: fmt
            for topic, fmt in settings.input.topics.items()
            if fmt.format != "json" or fmt.cloudevents
        }
        if registry is None and any(f.format in REGISTRY_FORMATS for f in self._formats.values()):
            raise ValueError("a schema-registry format needs a SchemaRegistry")
        self._registry = registry
        self._max_decoders = settings.schema_registry.max_cached_schemas
        self._decoders: dict[int, tuple[str, Decoder] | SchemaMismatch] = {}

    def plain(self, topic: str) -> bool:
        """The topic's records are plain JSON: ``parse`` them (no await)."""
        return topic not in self._formats

    def parse(self, record: InputRecord) -> Event:
        """A JSON record's event, or EventRejected."""
        d = self._dedup
        return parse_event(
            record,
            id_field=d.event_id_field,
            id_header=d.event_id_header,
            type_field=self._type_field,
            max_id_length=d.max_event_id_length,
            correlation_id=self._correlation(record) if self._correlation_header else None,
        )

    async def decode(self, record: InputRecord) -> Event:
        """A record of a topic with a format's event, or EventRejected (may await the
        registry for as long as it is down)."""
        fmt = self._formats.get(record.topic)
        if fmt is None:
            return self.parse(record)
        if fmt.cloudevents:
            mode = cloudevents.mode(record)
            if mode is not None:
                return await self._cloudevent(record, fmt, mode)
        if record.value is None:
            raise EventRejected(Stage.PARSE, "record has no value (tombstone)", code="empty_value")
        body = await self._data(record.value, fmt.format)
        d = self._dedup
        return event_from_body(
            record,
            body,
            id_field=d.event_id_field,
            id_header=d.event_id_header,
            type_field=self._type_field,
            max_id_length=d.max_event_id_length,
            correlation_id=self._correlation(record),
        )

    async def _cloudevent(
        self, record: InputRecord, fmt: TopicFormat, mode: cloudevents.Mode
    ) -> Event:
        if mode is cloudevents.Mode.BINARY:
            body = cloudevents.binary_attributes(record)
            if record.value is not None:
                body["data"] = await self._ce_data(record.value, fmt, body)
        else:
            body = cloudevents.structured_event(record.value)
            encoded = body.pop("data_base64", None)
            if encoded is not None:
                try:
                    raw = base64.b64decode(str(encoded), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise EventRejected(
                        Stage.PARSE,
                        "CloudEvent: data_base64 is not base64",
                        code="invalid_cloudevent",
                    ) from exc
                body["data"] = await self._ce_data(raw, fmt, body)
        return event_from_body(
            record,
            body,
            id_field="id",
            id_header=self._dedup.event_id_header,
            type_field="type",
            max_id_length=self._dedup.max_event_id_length,
            correlation_id=self._correlation(record),
            time_field="time" if body.get("time") else None,
            dedup_scope=body["source"],  # CloudEvents: source + id is what is unique
        )

    async def _ce_data(self, raw: bytes, fmt: TopicFormat, attributes: dict[str, Any]) -> Any:
        """A CloudEvent's data: the topic's registry format, or JSON when its content type
        says JSON, else text."""
        if fmt.format != "json":
            return await self._data(raw, fmt.format)
        if cloudevents.is_json(attributes.get("datacontenttype")):
            return _json(raw, "CloudEvent data")
        return raw.decode("utf-8", "replace")

    async def _data(self, value: bytes, fmt: str) -> Any:
        if fmt == "json":
            return _json(value, "value")
        if len(value) < WIRE_HEADER_BYTES or value[0] != MAGIC_BYTE:
            first = f"0x{value[0]:02x}" if value else "nothing"
            raise schema_error(
                f"value is not in the schema registry's wire format (magic byte 0, schema "
                f"id): it starts with {first}"
            )
        schema_id = int.from_bytes(value[1:WIRE_HEADER_BYTES], "big")
        decoder = await self._decoder(schema_id, fmt)
        try:
            return decoder(value[WIRE_HEADER_BYTES:])
        except SchemaMismatch as exc:
            raise schema_error(f"schema id {schema_id}: {exc}") from exc
        except Exception as exc:
            # hostile input: a library's own failure (nesting past the recursion limit, a
            # type its converter does not know) is this record's, not the session's
            raise schema_error(
                f"schema id {schema_id}: decoding failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _decoder(self, schema_id: int, fmt: str) -> Decoder:
        built = self._decoders.get(schema_id)
        if built is None:
            built = await self._build(schema_id)
        if isinstance(built, SchemaMismatch):
            raise schema_error(f"schema id {schema_id}: {built}")
        schema_type, decoder = built
        if schema_type != SCHEMA_TYPES[fmt]:
            raise schema_error(
                f"schema id {schema_id} is a {schema_type} schema; the topic's format is {fmt}"
            )
        return decoder

    async def _build(self, schema_id: int) -> tuple[str, Decoder] | SchemaMismatch:
        if self._registry is None:  # the constructor refuses such a configuration
            raise RuntimeError("a schema-registry format without a registry")
        try:
            schema = await self._registry.schema(schema_id)
        except SchemaNotFound as exc:
            raise schema_error(f"schema id {schema_id}: {exc}") from exc
        built = self._decoders.get(schema_id)  # another job built it meanwhile
        if built is not None:
            return built
        try:
            built = (schema.schema_type, build_decoder(schema))
        except SchemaMismatch as exc:
            built = exc  # kept: every record of this id fails alike
        if len(self._decoders) >= self._max_decoders:
            self._decoders.pop(next(iter(self._decoders)))
        self._decoders[schema_id] = built
        return built

    def _correlation(self, record: InputRecord) -> str | None:
        """The correlation id from ``input.correlation_id_header``, when the record has a
        usable one (printable ASCII, at most CORRELATION_ID_MAX characters); else None
        (a new one is made)."""
        name = self._correlation_header
        if name is None:
            return None
        raw = record.header(name)
        if raw is None:
            return None
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        if len(text) > CORRELATION_ID_MAX or header_value_problem(text) is not None:
            return None
        return text


def _json(raw: bytes, what: str) -> Any:
    """``raw`` parsed as JSON, or the dead letter ``invalid_json`` naming ``what``."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventRejected(
            Stage.PARSE, f"{what} is not valid JSON: {exc}", code="invalid_json"
        ) from exc
