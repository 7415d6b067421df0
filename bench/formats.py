"""Input formats for ``bench/throughput.py --formats``: the bench's events in Avro, Protobuf
or JSON Schema, written by Confluent's own serializers against a real schema registry
(Apicurio, as the tests run it: ``tests/apicurio.py``), and the connector configured to
read them. The events carry the same fields as the JSON ones (``id``, ``type``, ``user``),
so the routes and the API calls are the same; only the decoding differs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bench.common import Topics, connector_config, start_connector

FORMATS = ("avro", "protobuf", "json_schema")
Encoder = Callable[[str, int], bytes]
Starter = Callable[[str, str, Topics], "subprocess.Popen[bytes]"]

FIELDS = ("id", "type", "user")
AVRO = orjson.dumps(
    {"type": "record", "name": "Bench", "fields": [{"name": f, "type": "string"} for f in FIELDS]}
).decode()
JSON_SCHEMA = orjson.dumps(
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Bench",
        "type": "object",
        "properties": {f: {"type": "string"} for f in FIELDS},
        "required": list(FIELDS),
    }
).decode()


def _bench_message() -> Any:
    file = descriptor_pb2.FileDescriptorProto(name="bench.proto", package="bench", syntax="proto3")
    message = file.message_type.add(name="Bench")
    for number, name in enumerate(FIELDS, 1):
        message.field.add(name=name, number=number, type=9, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Bench"))


def encoder(fmt: str, registry_url: str) -> Encoder:
    """(topic, i) -> the value of bench event ``b-{i}`` in ``fmt``'s wire format."""
    client = SchemaRegistryClient({"url": registry_url, "timeout": 30})
    if fmt == "avro":
        avro = AvroSerializer(client, AVRO)
        serialize: Callable[[dict[str, str], SerializationContext], bytes | None] = avro
    elif fmt == "json_schema":
        serialize = JSONSerializer(JSON_SCHEMA, client, to_dict=lambda obj, _ctx: obj)
    elif fmt == "protobuf":
        cls = _bench_message()
        proto = ProtobufSerializer(cls, client, {"use.deprecated.format": False})

        def serialize(body: dict[str, str], ctx: SerializationContext) -> bytes | None:
            return proto(cls(**body), ctx)
    else:
        raise ValueError(f"unknown format {fmt!r}")

    def encode(topic: str, i: int) -> bytes:
        body = {"id": f"b-{i}", "type": "bench", "user": f"user-{i % 500}"}
        value = serialize(body, SerializationContext(topic, MessageField.VALUE))
        assert value is not None
        return value

    return encode


def starter(fmt: str, registry_url: str) -> Starter:
    """The connector (``exactly_once``) reading its input topic in ``fmt``."""

    def start(bootstrap: str, base_url: str, topics: Topics) -> subprocess.Popen[bytes]:
        data = connector_config(
            bootstrap,
            base_url,
            topics,
            "exactly_once",
            input={"topics": {topics.input: {"format": fmt}}},
            schema_registry={"url": registry_url},
        )
        return start_connector(data)

    return start
