"""Input formats without a broker: decoders (Avro, Protobuf, JSON Schema), CloudEvents'
modes, the wire format's header, correlation ids, and the registry client against a real
HTTP server standing for a registry (aiohttp's own)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
import trustme
from aiohttp import web
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

from connector.config import ConnectorSettings, SchemaRegistrySettings
from connector.decoders import SchemaMismatch, build_decoder, jsonable
from connector.errors import EventRejected
from connector.events import InputRecord
from connector.formats import Parser
from connector.metrics import Metrics
from connector.registry import RegisteredSchema, SchemaNotFound, SchemaRegistry

ROUTES = [
    {
        "event_type": "*",
        "app_uid": "app",
        "agent_uid": "agent",
        "message_template": "m",
        "user": {"field": "externalUserId", "path": "user.id"},
    }
]


def settings(**sections: Any) -> ConnectorSettings:
    return ConnectorSettings(
        api={"api_key": "k"},
        routes=ROUTES,
        kafka={"input_topics": ["plain", "avro", "proto", "js", "ce"]},
        **sections,
    )


def record(value: bytes | None, topic: str = "plain", headers: Any = ()) -> InputRecord:
    return InputRecord(topic, 0, 0, b"k", value, tuple(headers))


# -- decoders -------------------------------------------------------------------------------

AVRO = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "id", "type": "long"},
        {
            "name": "amount",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 3},
        },
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "raw", "type": "bytes"},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


def avro_bytes(schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def test_avro_logical_types_come_out_as_json_would_give_them() -> None:
    decode = build_decoder(RegisteredSchema(1, "AVRO", orjson.dumps(AVRO).decode()))
    payload = avro_bytes(
        AVRO,
        {
            "id": 2**40,
            "amount": Decimal("1234.500"),
            "at": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
            "day": date(2026, 1, 2),
            "ref": "6f1c1c1e-8c1e-4f0e-9a43-2b2b8f6f6a11",
            "raw": b"\x00\xff",
            "kind": "B",
            "note": None,
        },
    )
    assert decode(payload) == {
        "id": 2**40,
        "amount": "1234.500",
        "at": "2026-01-02T03:04:05.123456Z",
        "day": "2026-01-02",
        "ref": "6f1c1c1e-8c1e-4f0e-9a43-2b2b8f6f6a11",
        "raw": "AP8=",
        "kind": "B",
        "note": None,
    }
    with pytest.raises(SchemaMismatch, match="does not fit"):
        decode(payload[:4])
    with pytest.raises(SchemaMismatch, match="2 bytes after the record"):
        decode(payload + b"\x00\x00")


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.00000001"), "0.00000001"),
        (Decimal("0E-8"), "0.00000000"),
        (Decimal("-0.00000250"), "-0.00000250"),
        (Decimal("123456789012.00000000"), "123456789012.00000000"),
    ],
)
def test_avro_decimals_are_plain_text_never_exponent_notation(amount: Decimal, text: str) -> None:
    """A decimal of scale 8 (a crypto or FX amount) under 1e-6, or zero, came out as
    ``"1E-8"`` / ``"0E-8"``: Python's str() of a Decimal, not the number as written."""
    schema = {
        "type": "record",
        "name": "Amount",
        "fields": [
            {
                "name": "amount",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 8},
            }
        ],
    }
    decode = build_decoder(RegisteredSchema(1, "AVRO", orjson.dumps(schema).decode()))
    assert decode(avro_bytes(schema, {"amount": amount})) == {"amount": text}


def test_avro_floats_come_out_as_written_not_widened() -> None:
    """An Avro ``float`` (32 bits) of 19.99 came out as 19.989999771118164 (its widening
    to a double), wherever it sits: a field, a union, an array, a map; a double stays."""
    schema = {
        "type": "record",
        "name": "Prices",
        "fields": [
            {"name": "amount", "type": "float"},
            {"name": "maybe", "type": ["null", "float"]},
            {"name": "history", "type": {"type": "array", "items": "float"}},
            {"name": "by_shop", "type": {"type": "map", "values": {"type": "float"}}},
            {"name": "exact", "type": "double"},
        ],
    }
    decode = build_decoder(RegisteredSchema(1, "AVRO", orjson.dumps(schema).decode()))
    value = {
        "amount": 19.99,
        "maybe": 0.1,
        "history": [0.1, 2.5],
        "by_shop": {"a": 7.3},
        "exact": 0.1,
    }
    assert decode(avro_bytes(schema, value)) == value


def test_avro_reference_resolves_a_named_type() -> None:
    user = {
        "type": "record",
        "name": "User",
        "namespace": "x",
        "fields": [{"name": "id", "type": "string"}],
    }
    main = {
        "type": "record",
        "name": "E",
        "namespace": "x",
        "fields": [{"name": "user", "type": "x.User"}],
    }
    from connector.registry import Reference

    schema = RegisteredSchema(
        2,
        "AVRO",
        orjson.dumps(main).decode(),
        (Reference("x.User", RegisteredSchema(1, "AVRO", orjson.dumps(user).decode())),),
    )
    payload = avro_bytes(
        {**main, "fields": [{"name": "user", "type": user}]}, {"user": {"id": "u"}}
    )
    assert build_decoder(schema)(payload) == {"user": {"id": "u"}}


def test_timestamps_keep_protobufs_fraction_digits() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert jsonable(at) == "2026-01-02T03:04:05Z"
    assert jsonable(at.replace(microsecond=250_000)) == "2026-01-02T03:04:05.250Z"
    assert jsonable(at.replace(microsecond=1)) == "2026-01-02T03:04:05.000001Z"
    assert jsonable(datetime(2026, 1, 2, 3, 4)) == "2026-01-02T03:04:00"  # local: no zone


def proto_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="t.proto",
        package="t",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto", "google/protobuf/wrappers.proto"],
    )
    color = file.enum_type.add(name="Color")
    color.value.add(name="RED", number=0)
    color.value.add(name="BLUE", number=1)
    outer = file.message_type.add(name="Outer")
    outer.field.add(name="id", number=1, type=3, label=1)  # int64
    inner = outer.nested_type.add(name="Inner")
    inner.field.add(name="at", number=1, type=11, label=1, type_name=".google.protobuf.Timestamp")
    inner.field.add(name="color", number=2, type=14, label=1, type_name=".t.Color")
    inner.field.add(name="tags", number=3, type=9, label=3)
    inner.field.add(
        name="maybe", number=4, type=11, label=1, type_name=".google.protobuf.Int64Value"
    )
    inner.field.add(name="blob", number=5, type=12, label=1)
    entry = inner.nested_type.add(
        name="CountsEntry", options=descriptor_pb2.MessageOptions(map_entry=True)
    )
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=5, label=1)
    inner.field.add(
        name="counts", number=6, type=11, label=3, type_name=".t.Outer.Inner.CountsEntry"
    )
    inner.field.add(name="child", number=7, type=11, label=1, type_name=".t.Outer")
    return file


def proto_schema() -> RegisteredSchema:
    text = base64.b64encode(proto_file().SerializeToString()).decode()
    return RegisteredSchema(5, "PROTOBUF", text)


def test_protobuf_nested_message_by_index_with_well_known_types() -> None:
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto_file())
    inner_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Outer.Inner"))
    message = inner_class(color=1, tags=["a", "b"], blob=b"\x01")
    message.at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    message.maybe.value = 2**40
    message.counts["x"] = 3
    # message indexes [0, 0] (Outer, then its first nested type), zig-zag: count 2 -> 4
    payload = b"\x04\x00\x00" + message.SerializeToString()
    assert build_decoder(proto_schema())(payload) == {
        "at": "2026-01-02T03:04:05Z",
        "color": "BLUE",
        "tags": ["a", "b"],
        "maybe": 2**40,
        "blob": "AQ==",
        "counts": {"x": 3},
    }
    # [0] written as the single byte 0; proto3 scalars are there at their default
    assert build_decoder(proto_schema())(b"\x00") == {"id": 0}
    with pytest.raises(SchemaMismatch, match=r"message index \[3\]"):
        build_decoder(proto_schema())(b"\x02\x06")
    with pytest.raises(SchemaMismatch, match=r"does not fit t\.Outer"):
        build_decoder(proto_schema())(b"\x00\xff\xff\xff")


def test_protobuf_floats_come_out_as_written_not_widened() -> None:
    """A proto ``float`` (32 bits) of 19.99 came out as 19.989999771118164, its widening
    to a double: a template wrote that price. The Protobuf JSON mapping (and every other
    runtime's) writes the shortest text that reads back to the same float: 19.99."""
    file = descriptor_pb2.FileDescriptorProto(name="f.proto", package="f", syntax="proto3")
    message = file.message_type.add(name="Price")
    message.field.add(name="amount", number=1, type=2, label=1)  # float
    message.field.add(name="history", number=2, type=2, label=3)  # repeated float
    message.field.add(name="exact", number=3, type=1, label=1)  # double: as it is
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    price = message_factory.GetMessageClass(pool.FindMessageTypeByName("f.Price"))
    payload = price(amount=19.99, history=[0.1, 2.5], exact=0.1).SerializeToString()
    text = base64.b64encode(file.SerializeToString()).decode()
    decode = build_decoder(RegisteredSchema(6, "PROTOBUF", text))
    assert decode(b"\x00" + payload) == {"amount": 19.99, "history": [0.1, 2.5], "exact": 0.1}


def test_protobuf_map_keys_are_written_as_json_writes_them() -> None:
    """A ``map<bool, ...>`` key came out as ``"True"`` (Python's text of the bool), where
    the Protobuf JSON mapping (and a template author) writes ``"true"``."""
    file = descriptor_pb2.FileDescriptorProto(name="k.proto", package="k", syntax="proto3")
    message = file.message_type.add(name="Flags")
    entry = message.nested_type.add(
        name="ByFlagEntry", options=descriptor_pb2.MessageOptions(map_entry=True)
    )
    entry.field.add(name="key", number=1, type=8, label=1)  # bool
    entry.field.add(name="value", number=2, type=9, label=1)
    message.field.add(
        name="by_flag", number=1, type=11, label=3, type_name=".k.Flags.ByFlagEntry"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    flags = message_factory.GetMessageClass(pool.FindMessageTypeByName("k.Flags"))
    payload = flags(by_flag={True: "on", False: "off"}).SerializeToString()
    text = base64.b64encode(file.SerializeToString()).decode()
    decode = build_decoder(RegisteredSchema(7, "PROTOBUF", text))
    assert decode(b"\x00" + payload) == {"by_flag": {"true": "on", "false": "off"}}


def test_protobuf_source_with_a_reference_is_compiled() -> None:
    from connector.registry import Reference

    user = RegisteredSchema(
        1, "PROTOBUF", 'syntax = "proto3";\npackage people;\nmessage User { string id = 1; }\n'
    )
    order = RegisteredSchema(
        2,
        "PROTOBUF",
        'syntax = "proto3";\npackage shop;\nimport "people/user.proto";\n'
        'import "google/protobuf/timestamp.proto";\n'
        "message Order { people.User user = 1; google.protobuf.Timestamp at = 2;"
        " map<string, int64> n = 3; optional string note = 4; }\n",
        (Reference("people/user.proto", user),),
    )
    decode = build_decoder(order)
    # user {id: "u"} (field 1, 3 bytes), n {"k": 2**40}
    inner = b"\x0a\x01u"
    entry = b"\x0a\x01k\x10" + bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x20])
    payload = (
        b"\x00" + b"\x0a" + bytes([len(inner)]) + inner + b"\x1a" + bytes([len(entry)]) + entry
    )
    assert decode(payload) == {"user": {"id": "u"}, "n": {"k": 2**40}}
    with pytest.raises(SchemaMismatch, match="protoc could not compile"):
        build_decoder(RegisteredSchema(7, "PROTOBUF", "message A { nonsense }"))


def test_json_schema_validates() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    decode = build_decoder(RegisteredSchema(3, "JSON", orjson.dumps(schema).decode()))
    assert decode(b'{"n": 1}') == {"n": 1}
    with pytest.raises(SchemaMismatch, match="at n"):
        decode(b'{"n": "one"}')
    with pytest.raises(SchemaMismatch, match="not JSON"):
        decode(b"{")


def test_unusable_schema_is_a_mismatch() -> None:
    with pytest.raises(SchemaMismatch, match="AVRO schema cannot be used"):
        build_decoder(RegisteredSchema(1, "AVRO", '{"type": "nope"}'))
    with pytest.raises(SchemaMismatch, match="not supported"):
        build_decoder(RegisteredSchema(1, "XML", "<x/>"))


# -- the parser -----------------------------------------------------------------------------


def test_plain_json_keeps_its_path_and_takes_the_correlation_header() -> None:
    parser = Parser(settings(input={"correlation_id_header": "x-request-id"}))
    assert parser.plain("plain")
    body = b'{"id": "e", "type": "t"}'
    event = parser.parse(record(body, headers=[("X-Request-Id", b" req-1 ")]))
    assert event.correlation_id == "req-1"
    for unusable in (b"", "caf\u00e9".encode(), b"a\nb", b"x" * 201):
        event = parser.parse(record(body, headers=[("x-request-id", unusable)]))
        assert len(event.correlation_id) == 32  # a new one


async def test_cloudevents_binary_structured_and_plain_records() -> None:
    parser = Parser(settings(input={"topics": {"ce": {"cloudevents": True}}}))
    assert not parser.plain("ce")
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"c-1"),
        ("ce_type", b"order.shipped"),
        ("ce_source", b"/s"),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("ce_traceparent", b"00-x"),
        ("content-type", b"application/json"),
    ]
    event = await parser.decode(record(b'{"orderId": 1}', "ce", headers))
    assert (event.event_id, event.event_type, event.time_field) == ("c-1", "order.shipped", "time")
    assert event.body == {
        "specversion": "1.0",
        "id": "c-1",
        "type": "order.shipped",
        "source": "/s",
        "time": "2026-01-02T03:04:05Z",
        "traceparent": "00-x",
        "datacontenttype": "application/json",
        "data": {"orderId": 1},
    }
    text = [*headers[:-1], ("content-type", b"text/plain")]
    assert (await parser.decode(record(b"hello", "ce", text))).body["data"] == "hello"
    structured = {
        "specversion": "1.0",
        "id": "c-2",
        "type": "t",
        "source": "/s",
        "data_base64": base64.b64encode(b'{"a": 1}').decode(),
    }
    event = await parser.decode(
        record(orjson.dumps(structured), "ce", [("content-type", b"application/cloudevents+json")])
    )
    assert event.body["data"] == {"a": 1} and event.time_field is None
    plain = await parser.decode(record(b'{"id": "p", "type": "t"}', "ce"))
    assert plain.event_id == "p"
    for bad, words in (
        ([h for h in headers if h[0] != "ce_source"], "source"),
        ([("ce_specversion", b"0.3"), *headers[1:]], "specversion"),
    ):
        with pytest.raises(EventRejected, match=words) as caught:
            await parser.decode(record(b"{}", "ce", bad))
        assert caught.value.code == "invalid_cloudevent"


async def test_a_cloudevent_attribute_in_two_headers_that_disagree_is_refused() -> None:
    """Two ``ce_id`` (or ``ce_source``) headers with different values, as a relay that
    appends its own attributes leaves them: the last one won, so the same two headers in
    the other order were another event (a second thread, or a real event dropped as a
    duplicate). Refused as ambiguous like two disagreeing id headers; copies that agree
    are one."""
    parser = Parser(settings(input={"topics": {"ce": {"cloudevents": True}}}))
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"c-1"),
        ("ce_type", b"order.shipped"),
        ("ce_source", b"/s"),
    ]
    for name, other in (("ce_id", b"c-2"), ("CE_SOURCE", b"/relay")):
        with pytest.raises(EventRejected, match=f"{name.lower()}.*different values") as caught:
            await parser.decode(record(b"{}", "ce", [*headers, (name, other)]))
        assert caught.value.code == "invalid_cloudevent"
    same = await parser.decode(record(b"{}", "ce", [*headers, ("ce_id", b"c-1")]))
    assert same.event_id == "c-1"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6


def test_the_default_schema_cache_fits_in_the_charts_memory() -> None:
    """Each Protobuf decoder holds its own descriptor pool (the well-known types, the
    schema, its classes): about 60 KB measured. At the old default of 10,000 cached
    schemas, records naming that many existing ids (the registry's ids are global: any
    Protobuf schema of any subject fits a Protobuf topic's header) took ~600 MB, an
    OOM kill under the chart's 768 Mi limit at every restart on the same records. The
    default times the measured cost must stay within a fifth of the limit."""
    file = descriptor_pb2.FileDescriptorProto(name="m.proto", package="m", syntax="proto3")
    message = file.message_type.add(name="M")
    for number in range(1, 21):
        message.field.add(name=f"f{number}", number=number, type=9, label=1)
    text = base64.b64encode(file.SerializeToString()).decode()
    built = 300
    kept = []
    before = _rss_mb()
    for schema_id in range(built):
        decode = build_decoder(RegisteredSchema(schema_id, "PROTOBUF", text))
        decode(b"\x00")
        kept.append(decode)
    per_decoder_mb = (_rss_mb() - before) / built
    default = SchemaRegistrySettings(url="http://r").max_cached_schemas
    assert default * per_decoder_mb < 768 * 1.048576 / 5, (default, per_decoder_mb)


async def test_wire_format_header_is_checked_before_any_fetch() -> None:
    parser = Parser(
        settings(
            input={"topics": {"avro": {"format": "avro"}}},
            schema_registry={"url": "http://127.0.0.1:1"},
        ),
        SchemaRegistry(SchemaRegistrySettings(url="http://127.0.0.1:1")),
    )
    for value, words in (
        (b"\x00\x00", "starts with 0x00"),
        (b"", "starts with nothing"),
        (b"{}", "0x7b"),
    ):
        with pytest.raises(EventRejected, match=words) as caught:
            await parser.decode(record(value, "avro"))
        assert caught.value.code == "schema_error"


# -- the registry client --------------------------------------------------------------------


class FakeRegistry:
    """A registry's REST answers from a real HTTP server, with failures on demand."""

    def __init__(self) -> None:
        self.requests: list[web.Request] = []
        self.fail_with: int | None = None
        self.fail_ids: set[int] = set()  # these ids answer 500
        self.lagging: dict[int, int] = {}  # id -> 404s answered before it (a lagging replica)
        self.schemas: dict[int, dict[str, Any]] = {
            1: {"schema": orjson.dumps(AVRO).decode()},
            2: {"schemaType": "PROTOBUF", "schema": "message A {}"},
        }
        self.release = asyncio.Event()
        self.release.set()

    async def by_id(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        await self.release.wait()
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        schema_id = int(request.match_info["id"])
        if schema_id in self.fail_ids:
            return web.Response(status=500)
        if self.lagging.get(schema_id, 0) > 0:
            self.lagging[schema_id] -= 1
            return web.json_response({"error_code": 40403}, status=404)
        found = self.schemas.get(schema_id)
        if found is None:
            return web.json_response({"error_code": 40403}, status=404)
        if request.query.get("format") == "serialized":
            text = base64.b64encode(proto_file().SerializeToString()).decode()
            return web.json_response({**found, "schema": text})
        return web.json_response(found)


@contextlib.asynccontextmanager
async def serving(
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[FakeRegistry, str]]:
    registry = FakeRegistry()
    app = web.Application()
    app.router.add_get("/schemas/ids/{id}", registry.by_id)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield registry, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeRegistry, str]]:
    async with serving() as served:
        yield served


async def test_one_fetch_per_id_and_cached(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    server.release.clear()
    async with SchemaRegistry(
        SchemaRegistrySettings(url=url), not_found_confirm_s=0.01
    ) as registry:
        waiting = [asyncio.ensure_future(registry.schema(1)) for _ in range(50)]
        while not server.requests:
            await asyncio.sleep(0.01)
        server.release.set()
        schemas = await asyncio.gather(*waiting)
        assert {s.schema_type for s in schemas} == {"AVRO"}
        await registry.schema(1)
        assert len(server.requests) == 1
        with pytest.raises(SchemaNotFound, match="schema id 9 not found"):
            await registry.schema(9)


async def test_protobuf_source_is_asked_again_serialized(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    async with SchemaRegistry(SchemaRegistrySettings(url=url)) as registry:
        schema = await registry.schema(2)
    assert [r.query.get("format") for r in server.requests] == [None, "serialized"]
    assert build_decoder(schema)(b"\x00") == {"id": 0}


async def test_outage_is_retried_and_named_until_it_ends(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    server.fail_with = 503
    metrics = Metrics()
    cfg = SchemaRegistrySettings(url=url, retry_initial_s=0.01, retry_max_s=0.02)
    async with SchemaRegistry(cfg, metrics) as registry:
        fetch = asyncio.ensure_future(registry.schema(1))
        while len(server.requests) < 3:
            await asyncio.sleep(0.01)
        assert registry.problem == "schema registry: HTTP 503 for schema id 1 (retrying)"
        assert metrics.schema_registry_up._value.get() == 0
        assert not fetch.done()
        server.fail_with = None
        assert (await fetch).schema_type == "AVRO"
        assert registry.problem is None
        assert metrics.schema_registry_up._value.get() == 1


async def test_one_failing_id_stays_named_while_other_ids_are_fetched(
    fake: tuple[FakeRegistry, str],
) -> None:
    """A registry answering 500 for one id only (a corrupt entry, a shard down): another
    id fetched meanwhile cleared the problem, so /readyz went green and the gauge said up
    while that id's records waited (their partition stalled) until the next retry."""
    server, url = fake
    server.fail_ids = {1}
    server.schemas[3] = server.schemas[1]
    metrics = Metrics()
    cfg = SchemaRegistrySettings(url=url, retry_initial_s=30, retry_max_s=30)
    async with SchemaRegistry(cfg, metrics, not_found_confirm_s=0.01) as registry:
        stuck = asyncio.ensure_future(registry.schema(1))
        while registry.problem is None:
            await asyncio.sleep(0.01)
        assert (await registry.schema(3)).schema_type == "AVRO"
        assert registry.problem == "schema registry: HTTP 500 for schema id 1 (retrying)"
        assert metrics.schema_registry_up._value.get() == 0
        with pytest.raises(SchemaNotFound):
            await registry.schema(9)
        assert registry.problem is not None
        assert not stuck.done()
    assert stuck.cancelled()


async def test_a_cancelled_waiter_leaves_the_fetch_to_the_others(
    fake: tuple[FakeRegistry, str],
) -> None:
    server, url = fake
    server.release.clear()
    async with SchemaRegistry(SchemaRegistrySettings(url=url)) as registry:
        first = asyncio.ensure_future(registry.schema(1))
        second = asyncio.ensure_future(registry.schema(1))
        while not server.requests:
            await asyncio.sleep(0.01)
        first.cancel()  # a revoked partition's job
        server.release.set()
        assert (await second).schema_id == 1


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"username": "u", "password": "p"}, "Basic " + base64.b64encode(b"u:p").decode()),
        ({"bearer_token": "tok"}, "Bearer tok"),
        ({}, None),
    ],
)
async def test_credentials_are_sent(
    fake: tuple[FakeRegistry, str], auth: dict[str, str], expected: str | None
) -> None:
    server, url = fake
    async with SchemaRegistry(SchemaRegistrySettings(url=url, **auth)) as registry:
        await registry.schema(1)
    assert server.requests[0].headers.get("Authorization") == expected


async def test_unauthorised_is_an_outage_not_a_dead_letter(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    server.fail_with = 401
    cfg = SchemaRegistrySettings(url=url, retry_initial_s=0.01, retry_max_s=0.01)
    async with SchemaRegistry(cfg) as registry:
        fetch = asyncio.ensure_future(registry.schema(1))
        while registry.problem is None:
            await asyncio.sleep(0.01)
        assert "HTTP 401" in registry.problem and "credentials" in registry.problem
        fetch.cancel()


async def test_https_registry_with_a_private_ca_and_a_password_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    password_file = tmp_path / "password"
    password_file.write_text("from-a-file\n")
    async with serving(server) as (registry, url):
        cfg = SchemaRegistrySettings(
            url=url, username="u", password_file=password_file, ca_file=ca_file
        )
        async with SchemaRegistry(cfg) as client:
            assert (await client.schema(1)).schema_type == "AVRO"
        expected = "Basic " + base64.b64encode(b"u:from-a-file").decode()
        assert registry.requests[0].headers["Authorization"] == expected
        # the system's trust store does not know the private CA: a TLS failure, retried
        untrusted = SchemaRegistrySettings(url=url, retry_initial_s=0.01, retry_max_s=0.01)
        async with SchemaRegistry(untrusted) as client:
            fetch = asyncio.ensure_future(client.schema(1))
            while client.problem is None:
                await asyncio.sleep(0.01)
            assert "TLS" in client.problem or "certificate" in client.problem
            fetch.cancel()


async def test_an_unreadable_password_file_is_an_outage_naming_it(tmp_path: Path) -> None:
    cfg = SchemaRegistrySettings(
        url="http://127.0.0.1:1",
        username="u",
        password_file=tmp_path / "missing",
        retry_initial_s=0.01,
        retry_max_s=0.01,
    )
    async with SchemaRegistry(cfg) as registry:
        fetch = asyncio.ensure_future(registry.schema(1))
        while registry.problem is None:
            await asyncio.sleep(0.01)
        assert "schema_registry.password_file: cannot read" in registry.problem
        fetch.cancel()


async def test_a_404_is_believed_for_a_while(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    now = [0.0]
    async with SchemaRegistry(
        SchemaRegistrySettings(url=url), clock=lambda: now[0], not_found_confirm_s=0.01
    ) as registry:
        for _ in range(3):
            with pytest.raises(SchemaNotFound):
                await registry.schema(9)
        assert len(server.requests) == 2  # a flood of records with a bad id: one, confirmed
        now[0] = 61.0
        server.schemas[9] = server.schemas[1]  # registered since
        assert (await registry.schema(9)).schema_type == "AVRO"


async def test_a_schema_the_replica_learns_a_moment_later_is_not_a_dead_letter(
    fake: tuple[FakeRegistry, str],
) -> None:
    """A producer registers a schema on one registry replica and writes a record; the
    replica we ask has not replicated it yet (404), and knows it a moment later. The 404
    was believed at once (and for 60 s): that record and every other of the new schema
    in the next minute were dead-lettered. The first 404 is asked again before belief."""
    server, url = fake
    server.schemas[9] = server.schemas[1]
    server.lagging[9] = 1  # one 404, then the schema
    async with SchemaRegistry(
        SchemaRegistrySettings(url=url), not_found_confirm_s=0.05
    ) as registry:
        assert (await registry.schema(9)).schema_type == "AVRO"
    assert len(server.requests) == 2


def deep_avro_record() -> tuple[RegisteredSchema, bytes]:
    """A recursive Avro type (a linked list) nested past Python's recursion limit."""
    schema = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "next", "type": ["null", "Node"], "default": None}],
    }
    depth = 5_000  # each level: union index 1 (zig-zag 2)
    return RegisteredSchema(1, "AVRO", orjson.dumps(schema).decode()), b"\x02" * depth + b"\x00"


async def test_a_decoder_crash_is_the_records_schema_error(fake: tuple[FakeRegistry, str]) -> None:
    server, url = fake
    schema, payload = deep_avro_record()
    server.schemas[1] = {"schema": schema.text}
    async with SchemaRegistry(SchemaRegistrySettings(url=url)) as registry:
        parser = Parser(
            settings(input={"topics": {"avro": {"format": "avro"}}}, schema_registry={"url": url}),
            registry,
        )
        with pytest.raises(EventRejected, match=r"schema id 1: .*Recursion") as caught:
            await parser.decode(record(b"\x00\x00\x00\x00\x01" + payload, "avro"))
    assert caught.value.code == "schema_error"


def test_only_recursive_avro_schemas_take_the_python_reader() -> None:
    from connector.decoders import _recursive

    def parsed(schema: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        named: dict[str, Any] = {}
        return fastavro.parse_schema(schema, named_schemas=named), named

    assert not _recursive(*parsed(AVRO), ())
    shared = {"type": "record", "name": "P", "fields": [{"name": "x", "type": "int"}]}
    twice = {
        "type": "record",
        "name": "Two",
        "fields": [{"name": "a", "type": shared}, {"name": "b", "type": "P"}],
    }
    assert not _recursive(*parsed(twice), ())  # a type used twice is not a cycle
    tree = {
        "type": "record",
        "name": "Tree",
        "fields": [{"name": "kids", "type": {"type": "array", "items": "Tree"}}],
    }
    assert _recursive(*parsed(tree), ())
