"""Schema-registry payloads to the event's JSON-like dict: Avro, Protobuf, JSON Schema.

Pure: a ``Decoder`` is built once per schema id from the registry's schema text (and its
references), then decodes payloads (the bytes after the wire format's header). Values come
out as the JSON path gives them, so templates, routes and the event time read them alike:

- Avro (fastavro): timestamps and dates as ISO-8601 text (``...Z`` for UTC), decimals as
  exact text (``"12.50"``), enums as their symbol, uuids as text, bytes as base64, a
  32-bit ``float`` as the shortest number that reads back to it (``19.99``).
- Protobuf: fields by their .proto names, enums by name, 64-bit integers as numbers,
  a 32-bit ``float`` as the shortest number that reads back to it (``19.99``),
  ``Timestamp`` as RFC 3339 text, ``Duration`` as ``"1.5s"``, wrappers as their value,
  ``Struct``/``Value`` as JSON; a field without presence (proto3 scalar) is always there
  (its default when unset), an unset message or ``optional`` field is absent.
- JSON Schema: the JSON value, validated against the schema (jsonschema).

``SchemaMismatch`` (a ValueError) means the payload does not fit its schema (or the schema
cannot be used): the caller dead-letters the record ``schema_error``.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import fastavro
import jsonschema
import orjson
import referencing
from fastavro.read import LOGICAL_READERS
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import DecodeError, Message

from connector.protoc import ProtocError, compile_sources
from connector.registry import RegisteredSchema

Decoder = Callable[[bytes], Any]


class SchemaMismatch(ValueError):
    """The payload cannot be decoded with its schema, or the schema cannot be used."""


def build_decoder(schema: RegisteredSchema) -> Decoder:
    """The decoder for one registered schema; SchemaMismatch if the schema is unusable."""
    kind = schema.schema_type
    try:
        if kind == "AVRO":
            return _avro(schema)
        if kind == "PROTOBUF":
            return _ProtobufDecoder(schema)
        if kind == "JSON":
            return _json_schema(schema)
    except SchemaMismatch:
        raise
    except Exception as exc:  # any library's refusal of the schema text
        raise SchemaMismatch(f"the {kind} schema cannot be used: {exc}") from exc
    raise SchemaMismatch(f"schema type {kind!r} is not supported")


def jsonable(value: Any) -> Any:
    """A decoded value as the JSON path would give it (see the module docstring)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime | time):
        # 0, 3 or 6 fraction digits, as the Protobuf JSON mapping writes a Timestamp
        micros = value.microsecond
        spec = "seconds" if micros == 0 else "milliseconds" if micros % 1000 == 0 else "auto"
        return value.isoformat(timespec=spec).replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")  # str() writes 1E-8 and 0E-8 for a small scale-8 amount
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return str(value)


# -- Avro ---------------------------------------------------------------------------------


# A 32-bit Avro float is read as its widening to a double (19.99 -> 19.989999771118164);
# every ``float`` of a schema is given this logical type, whose reader (fastavro's custom
# logical types, both its readers) gives the shortest double that reads back the same.
_FLOAT32 = "threads-connector-float32"
LOGICAL_READERS[f"float-{_FLOAT32}"] = lambda value, *_: type_checkers.ToShortestFloat(value)


def _short_floats(node: Any) -> Any:
    """The Avro schema (JSON) with ``_FLOAT32`` on every ``float`` without a logical type."""
    if node == "float":
        return {"type": "float", "logicalType": _FLOAT32}
    if isinstance(node, list):
        return [_short_floats(branch) for branch in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "float":
        return node if "logicalType" in node else {**node, "logicalType": _FLOAT32}
    out = dict(node)
    if kind in ("record", "error") and isinstance(node.get("fields"), list):
        out["fields"] = [
            {**f, "type": _short_floats(f["type"])} if isinstance(f, dict) and "type" in f else f
            for f in node["fields"]
        ]
    elif kind == "array" and "items" in node:
        out["items"] = _short_floats(node["items"])
    elif kind == "map" and "values" in node:
        out["values"] = _short_floats(node["values"])
    elif isinstance(kind, dict | list):
        out["type"] = _short_floats(kind)
    return out


def _avro(schema: RegisteredSchema) -> Decoder:
    named: dict[str, Any] = {}
    _avro_references(schema, named)
    parsed = fastavro.parse_schema(_short_floats(orjson.loads(schema.text)), named_schemas=named)
    read = fastavro.schemaless_reader
    if _recursive(parsed, named, ()):
        # fastavro's C reader recurses on the C stack: a record nesting a recursive type
        # ten thousand deep (10 KB) crashed the process (a segfault, at every restart).
        # Its pure-Python reader raises RecursionError instead: the record's schema_error.
        read = _python_reader()

    def decode(payload: bytes) -> Any:
        stream = io.BytesIO(payload)
        try:
            value = read(stream, parsed, None)
        except Exception as exc:  # EOFError, ValueError, IndexError, UnicodeDecodeError...
            raise SchemaMismatch(f"Avro payload does not fit the schema: {exc!r}") from exc
        left = len(payload) - stream.tell()
        if left:
            raise SchemaMismatch(f"Avro payload has {left} bytes after the record")
        return jsonable(value)

    return decode


def _recursive(node: Any, named: dict[str, Any], path: tuple[str, ...]) -> bool:
    """The Avro schema has a named type that contains itself (a tree, a linked list)."""
    if isinstance(node, str):
        if node in path:
            return True
        found = named.get(node)
        return found is not None and _recursive(found, named, path)
    if isinstance(node, list):
        return any(_recursive(branch, named, path) for branch in node)
    if not isinstance(node, dict):
        return False
    name = node.get("name")
    if node.get("type") in ("record", "error") and isinstance(name, str):
        if name in path:
            return True
        path = (*path, name)
        return any(_recursive(f.get("type"), named, path) for f in node.get("fields", ()))
    return any(
        _recursive(node[key], named, path) for key in ("type", "items", "values") if key in node
    )


def _python_reader() -> Callable[..., Any]:
    try:
        from fastavro import _read_py  # fastavro's pure-Python reader (no public name)
    except ImportError as exc:
        raise SchemaMismatch("recursive Avro schemas need fastavro's Python reader") from exc
    reader: Callable[..., Any] = _read_py.schemaless_reader
    return reader


def _avro_references(schema: RegisteredSchema, named: dict[str, Any]) -> None:
    for ref in schema.references:
        _avro_references(ref.schema, named)
        fastavro.parse_schema(_short_floats(orjson.loads(ref.schema.text)), named_schemas=named)


# -- JSON Schema ----------------------------------------------------------------------------


def _json_schema(schema: RegisteredSchema) -> Decoder:
    resources = []
    pending = list(schema.references)
    while pending:
        ref = pending.pop()
        pending.extend(ref.schema.references)
        contents = orjson.loads(ref.schema.text)
        resources.append((ref.name, referencing.Resource.from_contents(contents)))
    root = orjson.loads(schema.text)
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
    validator_class = jsonschema.validators.validator_for(root)
    validator_class.check_schema(root)
    validator = validator_class(root, registry=registry)

    def decode(payload: bytes) -> Any:
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise SchemaMismatch(f"payload is not JSON: {exc}") from exc
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise SchemaMismatch(f"JSON does not match the schema at {where}: {error.message}")
        return value

    return decode


# -- Protobuf -------------------------------------------------------------------------------

_WELL_KNOWN = (
    any_pb2,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
_WRAPPERS = {
    f"google.protobuf.{name}"
    for name in (
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
}
_AS_JSON = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.FieldMask",
    "google.protobuf.Empty",
    "google.protobuf.Any",
}


def _descriptor(text: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A schema served as a serialized descriptor (base64, what ``format=serialized``
    answers and what Confluent's Python serializer registers), or None for source."""
    try:
        return descriptor_pb2.FileDescriptorProto.FromString(
            base64.b64decode(text.strip(), validate=True)
        )
    except (binascii.Error, ValueError, DecodeError):
        return None


def _files(schema: RegisteredSchema, name: str, seen: set[str]) -> list[tuple[str, str]]:
    """(file name, text) of the schema and its references, dependencies first."""
    found: list[tuple[str, str]] = []
    for ref in schema.references:
        if ref.name in seen or ref.name.startswith("google/protobuf/"):
            continue
        seen.add(ref.name)
        found += _files(ref.schema, ref.name, seen)
    found.append((name, schema.text))
    return found


class _ProtobufDecoder:
    def __init__(self, schema: RegisteredSchema) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        for module in _WELL_KNOWN:
            self._pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
        main = f"schema-{schema.schema_id}.proto"
        files = _files(schema, main, set())
        descriptors = [_descriptor(text) for _, text in files]
        if all(d is not None for d in descriptors):
            protos = [d for d in descriptors if d is not None]
            for (name, _), proto in zip(files, protos, strict=True):
                proto.name = proto.name or name
        elif all(d is None for d in descriptors):
            try:
                compiled = compile_sources(dict(files), main)
            except ProtocError as exc:
                raise SchemaMismatch(str(exc)) from exc
            protos = [p for p in compiled if not p.name.startswith("google/protobuf/")]
        else:
            raise SchemaMismatch(
                "the schema and its references mix .proto source and serialized descriptors"
            )
        for proto in protos:
            self._pool.Add(proto)
        self._file = next((p for p in protos if p.name == main), protos[-1])
        self._classes: dict[tuple[int, ...], type[Message]] = {}

    def __call__(self, payload: bytes) -> Any:
        indexes, offset = _message_indexes(payload)
        cls = self._class(indexes)
        message = cls()
        try:
            message.ParseFromString(payload[offset:])
        except DecodeError as exc:
            name = cls.DESCRIPTOR.full_name
            raise SchemaMismatch(f"Protobuf payload does not fit {name}") from exc
        return _message_dict(message)

    def _class(self, indexes: tuple[int, ...]) -> type[Message]:
        cls = self._classes.get(indexes)
        if cls is not None:
            return cls
        types: Any = self._file.message_type
        name = self._file.package
        try:
            for index in indexes:
                found = types[index]
                name = f"{name}.{found.name}" if name else found.name
                types = found.nested_type
        except IndexError:
            raise SchemaMismatch(f"message index {list(indexes)} is not in the schema") from None
        cls = message_factory.GetMessageClass(self._pool.FindMessageTypeByName(name))
        self._classes[indexes] = cls
        return cls


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """A zig-zag varint (the wire format's message indexes) at ``offset``."""
    shift = result = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise SchemaMismatch("the message indexes after the schema id are cut short")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), offset
        shift += 7


def _message_indexes(payload: bytes) -> tuple[tuple[int, ...], int]:
    count, offset = _varint(payload, 0)
    if count == 0:
        return (0,), offset  # the first message of the file
    if count < 0 or count > 100:
        raise SchemaMismatch(f"{count} message indexes: not the Protobuf wire format")
    indexes = []
    for _ in range(count):
        index, offset = _varint(payload, offset)
        if index < 0:
            raise SchemaMismatch("a negative message index")
        indexes.append(index)
    return tuple(indexes), offset


def _message_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    field: Any
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            if _is_map(field):
                value_field = field.message_type.fields_by_name["value"]
                out[field.name] = {_map_key(k): _value(value_field, v) for k, v in value.items()}
            else:
                out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


# Descriptors are typed ``Any`` below: the stubs give each a union of the pure-Python and
# the upb class, whose optional members (``message_type``) are set for the field kinds read.


def _map_key(key: Any) -> str:
    """A map key as the Protobuf JSON mapping writes it: ``true``, ``42``, the string."""
    return ("true" if key else "false") if isinstance(key, bool) else str(key)


def _is_map(field: Any) -> bool:
    message_type = field.message_type
    return message_type is not None and bool(message_type.GetOptions().map_entry)


def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name in _WRAPPERS:
            return _value(field.message_type.fields_by_name["value"], value.value)
        if full_name in _AS_JSON:
            return json_format.MessageToDict(value)
        return _message_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if field.type == FieldDescriptor.TYPE_FLOAT:
        # the shortest double that reads back to the same 32-bit float: 19.99, not its
        # widening 19.989999771118164 (what the Protobuf JSON mapping writes)
        return type_checkers.ToShortestFloat(value)
    return value
