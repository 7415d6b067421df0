"""CloudEvents 1.0 over Kafka (the Kafka protocol binding): which mode a record is in, and
its attributes.

- **Binary mode**: the attributes are ``ce_*`` headers (``ce_id``, ``ce_type``, ...), the
  record's value is the event's data, its ``content-type`` header the ``datacontenttype``.
- **Structured mode**: ``content-type: application/cloudevents+json``; the value is the
  whole event as JSON, its data in ``data`` (JSON) or ``data_base64``.

Either way the connector sees the event as structured mode's JSON (``id``, ``type``,
``source``, ``subject``, ``time``, extensions, ``data``): ``id`` is the event id, ``type``
the event type, ``time`` the event time, and templates read ``${source}``,
``${subject}``, ``${data.orderId}``.

Pure; a small module rather than the ``cloudevents`` SDK: the binding's rules are a few
lines, the SDK's data unmarshaller is synchronous (our data may need a schema fetched
first), and its event object would be turned back into this dict anyway.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson

from connector.errors import EventRejected, Stage
from connector.events import InputRecord

HEADER_PREFIX = "ce_"
STRUCTURED_TYPE = "application/cloudevents"
REQUIRED = ("id", "source", "specversion", "type")


class Mode(Enum):
    BINARY = "binary"
    STRUCTURED = "structured"


def mode(record: InputRecord) -> Mode | None:
    """The record's CloudEvents mode, or None if it is not a CloudEvent."""
    content_type = record.header("content-type")
    if content_type is not None and content_type.strip().lower().startswith(
        STRUCTURED_TYPE.encode()
    ):
        return Mode.STRUCTURED
    if record.header("ce_specversion") is not None:
        return Mode.BINARY
    return None


def _rejected(reason: str) -> EventRejected:
    return EventRejected(Stage.PARSE, f"CloudEvent: {reason}", code="invalid_cloudevent")


def binary_attributes(record: InputRecord) -> dict[str, Any]:
    """The ``ce_*`` headers as attributes (``datacontenttype`` from ``content-type``).
    An attribute in two headers that disagree is refused: with the last one winning, the
    same headers in the other order would be another event."""
    attributes: dict[str, Any] = {}
    for name, value in record.headers:
        lower = name.lower()
        if lower.startswith(HEADER_PREFIX) and len(lower) > len(HEADER_PREFIX):
            attribute, text = lower[len(HEADER_PREFIX) :], _text(name, value)
            if attributes.get(attribute, text) != text:
                raise _rejected(f"{lower} headers with different values")
            attributes[attribute] = text
    content_type = record.header("content-type")
    if content_type is not None:
        attributes["datacontenttype"] = _text("content-type", content_type)
    _check(attributes)
    return attributes


def structured_event(value: bytes | None) -> dict[str, Any]:
    """The structured-mode event (JSON); its data still as sent (``data``/``data_base64``)."""
    if value is None:
        raise _rejected("structured mode, but the record has no value")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _rejected(f"structured mode, but the value is not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise _rejected(f"structured mode, but the value is JSON {type(event).__name__}")
    _check(event)
    return event


def _check(attributes: dict[str, Any]) -> None:
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        raise _rejected(f"required attribute(s) missing: {', '.join(missing)}")
    version = attributes["specversion"]
    if not isinstance(version, str) or not version.startswith("1."):
        raise _rejected(f"specversion {version!r} is not 1.x")
    for name in ("id", "type", "source"):
        if not isinstance(attributes[name], str):
            raise _rejected(f"attribute {name!r} is not a string")


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _rejected(f"header {name!r} is not UTF-8") from None


def is_json(content_type: Any) -> bool:
    """Data of this ``datacontenttype`` is JSON (no type says JSON, as the spec's format)."""
    if content_type is None:
        return True
    media = str(content_type).split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"
