"""Input formats on a real broker and a real schema registry (Apicurio, Confluent API):
Avro, Protobuf and JSON Schema events written by Confluent's own serializers become
threads; records their schema cannot decode are dead-lettered ``schema_error``; a registry
that is down turns readiness red, dead-letters nothing, and processing resumes when it
is back."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

from connector.app import Connector
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.apicurio import Apicurio
from tests.harness import Names, eventually, make_settings, produce, running
from tests.kafka_helpers import consume_all, header, wait_for_committed, wait_for_records
from tests.test_hostile_api import readyz

pytestmark = pytest.mark.integration

ROUTE: dict[str, Any] = {
    "event_type": "order.shipped",
    "app_uid": "demo-app",
    "agent_uid": "agent-orders",
    "user": {"field": "externalUserId", "path": "user.id"},
}
AVRO_SCHEMA = orjson.dumps(
    {
        "type": "record",
        "name": "OrderShipped",
        "namespace": "shop",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "type", "type": "string"},
            {
                "name": "user",
                "type": {
                    "type": "record",
                    "name": "User",
                    "fields": [{"name": "id", "type": "string"}],
                },
            },
            {
                "name": "total",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
            },
            {"name": "shippedAt", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {
                "name": "carrier",
                "type": {"type": "enum", "name": "Carrier", "symbols": ["DHL", "UPS"]},
            },
        ],
    }
).decode()
JSON_SCHEMA = orjson.dumps(
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "OrderShipped",
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "user": {
                "type": "object",
                "properties": {"id": {"type": "string"}},
                "required": ["id"],
            },
            "items": {"type": "integer", "minimum": 1},
        },
        "required": ["id", "type", "user", "items"],
    }
).decode()


def protobuf_class() -> Any:
    """shop.OrderShipped with a Timestamp, an int64 and an enum, built at run time (no
    protoc here): what a producer's generated class would be."""
    file = descriptor_pb2.FileDescriptorProto(
        name="shop/orders.proto",
        package="shop",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    status = file.enum_type.add(name="Status")
    status.value.add(name="STATUS_UNKNOWN", number=0)
    status.value.add(name="STATUS_SHIPPED", number=1)
    user = file.message_type.add(name="User")
    user.field.add(name="id", number=1, type=9, label=1)
    order = file.message_type.add(name="OrderShipped")
    order.field.add(name="id", number=1, type=9, label=1)
    order.field.add(name="type", number=2, type=9, label=1)
    order.field.add(name="user", number=3, type=11, label=1, type_name=".shop.User")
    order.field.add(
        name="shipped_at", number=4, type=11, label=1, type_name=".google.protobuf.Timestamp"
    )
    order.field.add(name="quantity", number=5, type=3, label=1)  # int64
    order.field.add(name="status", number=6, type=14, label=1, type_name=".shop.Status")
    order.field.add(name="gift_count", number=7, type=5, label=1)  # int32, left 0
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.OrderShipped"))


def dead_letter_count(connector: Connector, stage: str, reason: str) -> float:
    """The dead letters of that stage and reason, over every app and topic label."""
    return sum(
        sample.value
        for family in connector.metrics.dead_letters.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels["stage"] == stage
        and sample.labels["reason"] == reason
    )


JSON_MISMATCH = b'{"id": "j-2", "type": "order.shipped", "user": {"id": "u"}, "items": 0}'


def wire(schema_id: int, payload: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


async def test_avro_protobuf_json_schema_events_become_threads(
    kafka_bootstrap: str, apicurio: Apicurio
) -> None:
    names = Names.fresh("formats")
    topics = {fmt: f"{names.input}-{fmt}" for fmt in ("avro", "protobuf", "json_schema")}
    client = SchemaRegistryClient({"url": apicurio.url, "timeout": 30})
    shipped_at = datetime(2026, 12, 6, 8, 30, 15, 250_000, tzinfo=UTC)

    def ctx(fmt: str) -> SerializationContext:
        return SerializationContext(topics[fmt], MessageField.VALUE)

    avro = AvroSerializer(client, AVRO_SCHEMA)
    avro_value = avro(
        {
            "id": "avro-1",
            "type": "order.shipped",
            "user": {"id": "u-avro"},
            "total": Decimal("12.50"),
            "shippedAt": shipped_at,
            "carrier": "UPS",
        },
        ctx("avro"),
    )
    order_class = protobuf_class()
    proto = ProtobufSerializer(order_class, client, {"use.deprecated.format": False})
    message = order_class(id="proto-1", type="order.shipped", quantity=9_000_000_000, status=1)
    message.user.id = "u-proto"
    message.shipped_at.FromDatetime(shipped_at)
    proto_value = proto(message, ctx("protobuf"))
    json_ser = JSONSerializer(JSON_SCHEMA, client, to_dict=lambda obj, _ctx: obj)
    json_value = json_ser(
        {"id": "json-1", "type": "order.shipped", "user": {"id": "u-json"}, "items": 3},
        ctx("json_schema"),
    )
    assert avro_value is not None and proto_value is not None and json_value is not None
    avro_id = int.from_bytes(avro_value[1:5], "big")
    json_id = int.from_bytes(json_value[1:5], "big")

    routes = [
        {
            **ROUTE,
            "topic": topics["avro"],
            "message_template": "Order ${id} of ${total} went by ${carrier} at ${shippedAt}.",
            "event_time_field": "shippedAt",  # the logical type is an event time
            "max_event_age_s": 10 * 365 * 86_400,
        },
        {
            **ROUTE,
            "topic": topics["protobuf"],
            "message_template": "Order ${id}: ${quantity} ${status} at ${shipped_at}, "
            "gifts ${gift_count}.",
        },
        {**ROUTE, "topic": topics["json_schema"], "message_template": "Order ${id}: ${items}."},
    ]
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            routes=routes,
            kafka={"input_topics": list(topics.values())},
            input={"topics": {topic: {"format": fmt} for fmt, topic in topics.items()}},
            schema_registry={"url": apicurio.url},
        )
        async with running(settings) as connector:
            await produce(kafka_bootstrap, topics["avro"], [(b"k", avro_value)])
            await produce(kafka_bootstrap, topics["protobuf"], [(b"k", proto_value)])
            await produce(kafka_bootstrap, topics["json_schema"], [(b"k", json_value)])
            # what the schemas cannot decode: each is the record's fault
            await produce(
                kafka_bootstrap,
                topics["avro"],
                [
                    (b"bad", avro_value[:-3]),  # cut short
                    (b"bad", b'{"id": "plain-json"}'),  # not the wire format
                    (b"bad", wire(987_654, b"\x02x")),  # an id the registry does not have
                    (b"bad", json_value),  # a JSON Schema id on an Avro topic
                ],
            )
            await produce(
                kafka_bootstrap,
                topics["json_schema"],
                [(b"bad", wire(json_id, JSON_MISMATCH))],
            )
            results = await wait_for_records(kafka_bootstrap, names.results, 3)
            dead = await wait_for_records(kafka_bootstrap, names.dead, 5)
            assert dead_letter_count(connector, "parse", "schema_error") == 5

    messages = {t.event_id: t.message for t in sim.store.all()}
    assert messages == {
        "avro-1": "Order avro-1 of 12.50 went by UPS at 2026-12-06T08:30:15.250Z.",
        "proto-1": "Order proto-1: 9000000000 STATUS_SHIPPED at 2026-12-06T08:30:15.250Z, gifts 0.",
        "json-1": "Order json-1: 3.",
    }
    assert sorted(orjson.loads(r.value)["eventId"] for r in results) == [
        "avro-1",
        "json-1",
        "proto-1",
    ]
    reasons = sorted((header(d, "dlq-code"), header(d, "dlq-reason") or "") for d in dead)
    assert all(code == "schema_error" for code, _ in reasons)
    text = "\n".join(reason for _, reason in reasons)
    assert f"schema id {avro_id}: Avro payload" in text
    assert "not in the schema registry's wire format" in text and "starts with 0x7b" in text
    assert "schema id 987654: schema id 987654 not found" in text
    assert f"schema id {json_id} is a JSON schema; the topic's format is avro" in text
    assert f"schema id {json_id}: JSON does not match the schema at items" in text


async def test_registry_down_pauses_then_resumes(
    kafka_bootstrap: str, private_apicurio: Apicurio
) -> None:
    names = Names.fresh("regdown")
    client = SchemaRegistryClient({"url": private_apicurio.url, "timeout": 30})
    avro = AvroSerializer(client, AVRO_SCHEMA)
    ctx = SerializationContext(names.input, MessageField.VALUE)
    values = [
        avro(
            {
                "id": f"e-{i}",
                "type": "order.shipped",
                "user": {"id": f"u-{i}"},
                "total": Decimal("1.00"),
                "shippedAt": datetime.now(UTC),
                "carrier": "DHL",
            },
            ctx,
        )
        for i in range(3)
    ]
    private_apicurio.stop()  # down before the connector has fetched a schema
    async with ThreadsApiSimulator(SimulatorSettings(seed=4)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            routes=[{**ROUTE, "message_template": "Order ${id} by ${carrier}."}],
            input={"topics": {names.input: {"format": "avro"}}},
            schema_registry={
                "url": private_apicurio.url,
                "retry_initial_s": 0.2,
                "retry_max_s": 1.0,
                "request_timeout_s": 2.0,
            },
        )
        async with running(settings) as connector:
            await produce(kafka_bootstrap, names.input, [(b"k", v) for v in values])

            async def registry_named() -> bool:
                status, detail = await readyz(connector)
                return status == 503 and "schema registry" in detail

            await eventually(registry_named)
            assert connector.metrics.schema_registry_up._value.get() == 0
            assert connector.metrics.schema_registry_failures._value.get() >= 1
            assert await consume_all(kafka_bootstrap, names.dead) == []
            assert len(sim.store) == 0

            # back, with the same schemas; started in a thread: the JVM's start-up blocked
            # this event loop, the in-process connector's too, past its session timeout
            # (a frozen member: its commit is refused and its events replayed)
            await asyncio.to_thread(private_apicurio.start)
            results = await wait_for_records(kafka_bootstrap, names.results, 3)

            async def ready() -> bool:
                return (await readyz(connector))[0] == 200

            await eventually(ready)
            assert connector.metrics.schema_registry_up._value.get() == 1
        assert sorted(orjson.loads(r.value)["eventId"] for r in results) == ["e-0", "e-1", "e-2"]
        assert await consume_all(kafka_bootstrap, names.dead) == []
        assert sim.store.count_by_event_id() == {"e-0": 1, "e-1": 1, "e-2": 1}


def ce_headers(event_id: str, **extra: str) -> list[tuple[str, bytes]]:
    attributes = {
        "ce_specversion": "1.0",
        "ce_id": event_id,
        "ce_type": "order.shipped",
        "ce_source": "/shop/orders",
        "ce_subject": f"order-{event_id}",
        "ce_time": datetime.now(UTC).isoformat(),
        **extra,
    }
    return [(k, v.encode()) for k, v in attributes.items()]


async def test_cloudevents_binary_and_structured_headers_forwarded(
    kafka_bootstrap: str, apicurio: Apicurio
) -> None:
    names = Names.fresh("ce")
    avro_topic = f"{names.input}-avro"
    client = SchemaRegistryClient({"url": apicurio.url, "timeout": 30})
    avro_schema = orjson.dumps(
        {
            "type": "record",
            "name": "Shipped",
            "fields": [
                {"name": "orderId", "type": "string"},
                {"name": "user", "type": {"type": "map", "values": "string"}},
            ],
        }
    ).decode()
    avro_data = AvroSerializer(client, avro_schema)(
        {"orderId": "A-7", "user": {"id": "u-avro"}},
        SerializationContext(avro_topic, MessageField.VALUE),
    )
    assert avro_data is not None
    data = orjson.dumps({"orderId": "A-1", "user": {"id": "u-1"}})
    two_days_ago = datetime.fromtimestamp(time.time() - 2 * 86_400, UTC).isoformat()
    structured = orjson.dumps(
        {
            "specversion": "1.0",
            "id": "ce-structured",
            "type": "order.shipped",
            "source": "/shop/web",
            "subject": "order-9",
            "time": datetime.now(UTC).isoformat(),
            "datacontenttype": "application/json",
            "data": {"orderId": "A-9", "user": {"id": "u-9"}},
        }
    )
    route = {
        **ROUTE,
        "user": {"field": "externalUserId", "path": "data.user.id"},
        "message_template": "${data.orderId} from ${source} (${subject}).",
        "max_event_age_s": 3600,  # a CloudEvent's time is its event time
    }
    async with ThreadsApiSimulator(SimulatorSettings(seed=6)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            routes=[route],
            kafka={"input_topics": [names.input, avro_topic]},
            input={
                "topics": {
                    names.input: {"cloudevents": True},
                    avro_topic: {"format": "avro", "cloudevents": True},
                },
                "correlation_id_header": "x-request-id",
            },
            results={"forward_headers": ["traceparent", "X-Tenant"]},
            schema_registry={"url": apicurio.url},
        )
        traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with running(settings):
            await produce(
                kafka_bootstrap,
                names.input,
                [(b"k", data)],
                headers=[
                    *ce_headers("ce-binary"),
                    ("content-type", b"application/json"),
                    ("traceparent", traceparent),
                    ("x-tenant", b"acme"),
                    ("x-secret", b"not forwarded"),
                    ("x-request-id", b"req-42"),
                ],
            )
            await produce(
                kafka_bootstrap,
                names.input,
                [(b"k", structured)],
                headers=[("content-type", b"application/cloudevents+json; charset=utf-8")],
            )
            await produce(kafka_bootstrap, avro_topic, [(b"k", avro_data)], ce_headers("ce-avro"))
            await produce(  # too old by its ce_time
                kafka_bootstrap,
                names.input,
                [(b"k", data)],
                ce_headers("ce-old", ce_time=two_days_ago),
            )
            await produce(  # no ce_type: not a CloudEvent it can read
                kafka_bootstrap,
                names.input,
                [(b"k", data)],
                [h for h in ce_headers("ce-broken") if h[0] != "ce_type"],
            )
            results = await wait_for_records(kafka_bootstrap, names.results, 3)
            dead = await wait_for_records(kafka_bootstrap, names.dead, 2)

    threads = {t.event_id: t for t in sim.store.all()}
    assert {k: t.message for k, t in threads.items()} == {
        "ce-binary": "A-1 from /shop/orders (order-ce-binary).",
        "ce-structured": "A-9 from /shop/web (order-9).",
        "ce-avro": "A-7 from /shop/orders (order-ce-avro).",
    }
    assert threads["ce-binary"].correlation_id == "req-42"
    assert threads["ce-structured"].correlation_id not in (None, "req-42")
    by_id = {orjson.loads(r.value)["eventId"]: r for r in results}
    binary = by_id["ce-binary"]
    assert header(binary, "correlation-id") == "req-42"
    assert header(binary, "traceparent") == traceparent.decode()
    assert header(binary, "x-tenant") == "acme"
    assert header(binary, "x-secret") is None
    assert {(header(d, "dlq-event-id"), header(d, "dlq-code")) for d in dead} == {
        ("ce-old", "expired"),
        (None, "invalid_cloudevent"),
    }


async def test_check_config_online_asks_the_registry(apicurio: Apicurio) -> None:
    from connector.localkafka.ports import free_ports
    from connector.preflight import Status
    from connector.preflight_online import registry_checks

    names = Names.fresh("online")
    good = make_settings(
        "127.0.0.1:1", "http://127.0.0.1:1", names, schema_registry={"url": apicurio.url}
    )
    [found] = await registry_checks(good)
    assert (found.name, found.status) == ("registry", Status.OK)
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    bad = make_settings("127.0.0.1:1", "http://127.0.0.1:1", names, schema_registry={"url": down})
    [found] = await registry_checks(bad)
    assert found.status is Status.FAIL and down in found.detail
    assert "ClientConnectorError" in found.detail or "Connect" in found.detail
    assert await registry_checks(make_settings("127.0.0.1:1", "http://127.0.0.1:1", names)) == []


def register(registry_url: str, subject: str, body: dict[str, Any]) -> int:
    """Register a schema as a Java producer would: the .proto text, over the REST API."""
    response = httpx.post(
        f"{registry_url}/subjects/{subject}/versions",
        json=body,
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["id"])


async def test_protobuf_registered_as_proto_source_with_a_reference(
    kafka_bootstrap: str, apicurio: Apicurio
) -> None:
    names = Names.fresh("protosrc")
    user_source = 'syntax = "proto3";\npackage people;\nmessage User { string id = 1; }\n'
    order_source = (
        'syntax = "proto3";\npackage shop;\nimport "people/user.proto";\n'
        "message Envelope { message Shipped { string id = 1; string type = 2;"
        " people.User user = 3; int64 total_cents = 200; } }\n"
    )
    register(apicurio.url, f"{names.input}-user", {"schemaType": "PROTOBUF", "schema": user_source})
    schema_id = register(
        apicurio.url,
        f"{names.input}-value",
        {
            "schemaType": "PROTOBUF",
            "schema": order_source,
            "references": [
                {"name": "people/user.proto", "subject": f"{names.input}-user", "version": 1}
            ],
        },
    )
    # Envelope.Shipped: message indexes [0, 0] (zig-zag: count 2 -> 4, then 0, 0)
    user = b"\x0a\x03u-1"
    message = (
        b"\x0a\x04ps-1"
        + b"\x12\x0dorder.shipped"
        + b"\x1a"
        + bytes([len(user)])
        + user
        + b"\xc0\x0c\xb9\x60"  # field 200 (varint): 12345
    )
    value = wire(schema_id, b"\x04\x00\x00" + message)
    async with ThreadsApiSimulator(SimulatorSettings(seed=7)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            routes=[{**ROUTE, "message_template": "Order ${id}: ${total_cents} cents."}],
            input={"topics": {names.input: {"format": "protobuf"}}},
            schema_registry={"url": apicurio.url},
        )
        async with running(settings):
            await produce(kafka_bootstrap, names.input, [(b"k", value)])
            results = await wait_for_records(kafka_bootstrap, names.results, 1)
        assert [orjson.loads(r.value)["eventId"] for r in results] == ["ps-1"]
        assert [t.message for t in sim.store.all()] == ["Order ps-1: 12345 cents."]
        assert await consume_all(kafka_bootstrap, names.dead) == []


async def test_cloudevents_of_two_sources_with_the_same_id_are_two_events(
    kafka_bootstrap: str,
) -> None:
    """CloudEvents' ids are unique within a source only (spec: "source + id is unique for
    each distinct event"): producers numbering their events, or two services on one topic,
    send the same id from different sources. Deduplicating by ``id`` alone dropped the
    second source's event as a duplicate (no thread, no dead letter: lost). A redelivered
    copy (same source, same id) is still one thread."""
    names = Names.fresh("ce-src")
    data = orjson.dumps({"orderId": "A-1", "user": {"id": "u-1"}})
    route = {**ROUTE, "user": {"field": "externalUserId", "path": "data.user.id"}}
    route["message_template"] = "${data.orderId} from ${source}."
    async with ThreadsApiSimulator(SimulatorSettings(seed=8)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            routes=[route],
            input={"topics": {names.input: {"cloudevents": True}}},
        )
        async with running(settings):
            for source in ("/shop/orders", "/shop/returns", "/shop/orders"):
                headers = [(k, v) for k, v in ce_headers("1") if k != "ce_source"]
                await produce(
                    kafka_bootstrap,
                    names.input,
                    [(b"k", data)],
                    headers=[*headers, ("ce_source", source.encode())],
                )
            await wait_for_committed(kafka_bootstrap, names.group, names.input)
            results = await consume_all(kafka_bootstrap, names.results)
    assert sorted(t.message for t in sim.store.all()) == [
        "A-1 from /shop/orders.",
        "A-1 from /shop/returns.",
    ]
    assert len(results) == 2
    assert await consume_all(kafka_bootstrap, names.dead) == []
