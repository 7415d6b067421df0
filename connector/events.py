"""Domain values and their wire forms: input records, parsed events, results, dead letters.

Pure: no I/O. Everything the sink writes is built here, so what reaches Kafka is decided
in one place (and the API key or the system message text can never slip into it).
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from connector.errors import EventRejected, Stage
from connector.utf8 import header_text

RESULT_SCHEMA_VERSION = 1
Headers = tuple[tuple[str, bytes], ...]
TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One record as consumed, untouched."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int = 0
    # why the Kafka client could not decode it (read from its bytes instead,
    # ``connector.undecodable``): the pipeline dead-letters it. None: a normal record.
    undecodable: str | None = None

    @property
    def tp(self) -> TopicPartitionKey:
        return (self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        """The last header of that name (case-insensitive), as Kafka clients do."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    def header_values(self, name: str) -> list[bytes]:
        """Every header of that name (case-insensitive), in order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


EventId = str | int


@dataclass(frozen=True, slots=True)
class Event:
    """A parsed domain event: its id, its type and its JSON body.

    ``event_id`` is the id as text (headers, logs, templates); ``event_id_value`` is the id
    as the producer typed it (a string or an integer), which the result record keeps;
    ``dedup_key`` is its JSON encoding, so ``5`` and ``"5"`` are different events; with a
    ``dedup_scope`` (a CloudEvent's ``source``: its ids are unique within one source only)
    the key is ``[scope, id]``, so two sources' event ``1`` are two events.
    """

    event_id: str
    event_type: str
    body: dict[str, Any]
    record: InputRecord
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    event_id_value: EventId | None = None  # None: the same as ``event_id`` (a string)
    time_field: str | None = None  # the event time's path when the route names none
    dedup_scope: str | None = None  # the namespace of the id (a CloudEvent's source)

    @property
    def id_value(self) -> EventId:
        return self.event_id if self.event_id_value is None else self.event_id_value

    @property
    def dedup_key(self) -> str:
        key = dedup_key(self.id_value)
        if self.dedup_scope is None:
            return key
        return f"[{orjson.dumps(self.dedup_scope).decode()},{key}]"


def dedup_key(event_id: EventId) -> str:
    """The id's JSON encoding: ``"5"`` for the string, ``5`` for the integer (its decimal
    digits, of any length: orjson encodes only 64-bit integers)."""
    if isinstance(event_id, int):
        return str(event_id)
    return orjson.dumps(event_id).decode()


@dataclass(frozen=True, slots=True)
class ThreadCreated:
    """The API's 201 answer, with what it cost to get it."""

    thread_uid: str
    human_uid: str
    agent_uid: str
    attempts: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record for the sink to write."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    partition: int | None = None


def lookup(body: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``user.id``); KeyError if any step is missing."""
    node: Any = body
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def parse_event(
    record: InputRecord,
    *,
    id_field: str,
    id_header: str,
    type_field: str,
    max_id_length: int = 256,
    correlation_id: str | None = None,
) -> Event:
    """Decode the record's JSON and find its event id and type, or raise EventRejected
    (``event_from_body`` says how)."""
    if record.value is None:
        raise EventRejected(Stage.PARSE, "record has no value (tombstone)", code="empty_value")
    try:
        body = orjson.loads(record.value)
    except orjson.JSONDecodeError as exc:
        if not record.value.strip():
            raise EventRejected(Stage.PARSE, "record value is empty", code="empty_value") from None
        body = _with_long_id(record.value, exc, id_field)
        if body is _MISSING:
            raise EventRejected(
                Stage.PARSE, f"value is not valid JSON: {exc}", code="invalid_json"
            ) from exc
    return event_from_body(
        record,
        body,
        id_field=id_field,
        id_header=id_header,
        type_field=type_field,
        max_id_length=max_id_length,
        correlation_id=correlation_id,
    )


def event_from_body(
    record: InputRecord,
    body: Any,
    *,
    id_field: str,
    id_header: str,
    type_field: str,
    max_id_length: int = 256,
    correlation_id: str | None = None,
    time_field: str | None = None,
    dedup_scope: str | None = None,
) -> Event:
    """The event of a decoded body (JSON, or a schema-registry format decoded alike).

    The id is the body's ``id_field`` (a string or an integer) or, when the body has none,
    the ``id_header`` header (a string). Any other JSON type, an empty id or one longer
    than ``max_id_length`` characters is rejected (``invalid_event_id``): coercing a float,
    a bool or an object to text would make different events collide. ``time_field``: the
    event time's path when the route names none (a CloudEvent's ``time``); ``dedup_scope``:
    the namespace the id is unique in (a CloudEvent's ``source``).
    """
    if not isinstance(body, dict):
        raise EventRejected(
            Stage.PARSE,
            f"value is JSON {type(body).__name__}, not an object",
            code="not_an_object",
        )
    event_id = _event_id(record, body, id_field, id_header, max_id_length)
    event_type = _scalar(body, type_field)
    if not event_type:
        raise EventRejected(
            Stage.VALIDATE,
            f"no event type: field '{type_field}' missing",
            code="no_event_type",
        )
    return Event(
        event_id=str(event_id),
        event_type=event_type,
        body=body,
        record=record,
        correlation_id=correlation_id or uuid.uuid4().hex,
        event_id_value=event_id if isinstance(event_id, int) else None,
        time_field=time_field,
        dedup_scope=dedup_scope,
    )


_MISSING = object()


def _event_id(
    record: InputRecord, body: dict[str, Any], id_field: str, id_header: str, max_length: int
) -> EventId:
    value: Any
    try:
        value = lookup(body, id_field)
    except KeyError:
        value = _MISSING
    where = f"field '{id_field}'"
    if isinstance(value, float):
        value = _exact_number(record, id_field, value)
    if value is _MISSING:
        raw = _header_id(record, id_header)
        if raw is None:
            raise EventRejected(
                Stage.VALIDATE,
                f"no event id: field '{id_field}' and header '{id_header}' missing",
                code="no_event_id",
            )
        where = f"header '{id_header}'"
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise EventRejected(
                Stage.VALIDATE, f"event id in {where} is not UTF-8", code="invalid_event_id"
            ) from exc
        if not value:  # an empty header says as much as no header
            raise EventRejected(
                Stage.VALIDATE,
                f"no event id: field '{id_field}' missing and header '{id_header}' empty",
                code="no_event_id",
            )
    if isinstance(value, bool) or not isinstance(value, str | int):
        kind = "null" if value is None else type(value).__name__
        raise EventRejected(
            Stage.VALIDATE,
            f"event id in {where} is a JSON {kind}: a string or an integer is required",
            code="invalid_event_id",
        )
    if isinstance(value, str) and not value:
        raise EventRejected(
            Stage.VALIDATE, f"event id in {where} is empty", code="invalid_event_id"
        )
    length = len(value) if isinstance(value, str) else len(str(value))
    if length > max_length:
        raise EventRejected(
            Stage.VALIDATE,
            f"event id in {where} has {length} characters, over {max_length}",
            code="invalid_event_id",
        )
    return value


def _exact_number(record: InputRecord, id_field: str, parsed: float) -> Any:
    """The id as the input wrote it when orjson read it as a float: orjson reads an
    integer beyond 64 bits as a float, so the value is parsed again with the standard
    library, which keeps integers exact (only for float ids: the common path is untouched).
    A real float (``1.5``, ``1e30``) stays a float and is refused by the caller."""
    if record.value is None:
        return parsed
    try:
        exact = lookup(json.loads(record.value), id_field)
    except (ValueError, KeyError, RecursionError):  # digits over Python's int limit
        return parsed
    return exact if isinstance(exact, int) and not isinstance(exact, bool) else parsed


def _with_long_id(raw: bytes, refused: orjson.JSONDecodeError, id_field: str) -> Any:
    """orjson refuses an integer of 309 digits or more ("number is infinity when parsed as
    double"): when that integer is the event id (an id of any length), the value is read
    again with the standard library, which keeps integers exact. Anything else stays
    refused (``_MISSING``): such a number in another field, a float out of range,
    ``NaN``, a lone surrogate, bad syntax."""
    if "infinity" not in str(refused):
        return _MISSING
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_not_json)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate raises
        event_id = lookup(body, id_field)
    except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeError: a ValueError
        return _MISSING
    is_int = isinstance(event_id, int) and not isinstance(event_id, bool)
    return body if is_int and abs(event_id) > sys.float_info.max else _MISSING


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:20]}... is infinity when parsed as double")
    return value


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def _header_id(record: InputRecord, name: str) -> bytes | None:
    """The id header's value; copies that disagree are refused (``ambiguous_event_id``):
    with the last one winning, the same two headers in the other order were another
    event. Copies that agree (the same id, around white space) are one."""
    values = record.header_values(name)
    if len(values) > 1 and len({v.strip() for v in values}) > 1:
        raise EventRejected(
            Stage.VALIDATE,
            f"{len(values)} '{name}' headers with different values",
            code="ambiguous_event_id",
        )
    return values[-1] if values else None


def _scalar(body: dict[str, Any], path: str) -> str | None:
    try:
        value = lookup(body, path)
    except KeyError:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


_now_cache: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now, ISO-8601 to the millisecond; formatted once per millisecond (a result record
    per event under load formats the same instant many times)."""
    global _now_cache
    now_ms = time.time_ns() // 1_000_000
    if _now_cache[0] != now_ms:
        when = datetime.fromtimestamp(now_ms // 1000, UTC).replace(microsecond=now_ms % 1000 * 1000)
        _now_cache = (now_ms, when.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    return _now_cache[1]


def result_record(
    topic: str,
    event: Event,
    *,
    app_uid: str,
    created: ThreadCreated,
    deep_link: str,
    user_key: str,
    forward_headers: frozenset[str] = frozenset(),
) -> OutRecord:
    """The results-topic record (DESIGN.md §7). Keyed by the user for per-user order.
    ``forward_headers``: lower-case names of the event's headers copied to it, as they are
    (``results.forward_headers``)."""
    src = event.record
    value = {
        "schemaVersion": RESULT_SCHEMA_VERSION,
        "eventId": event.id_value,  # as the producer typed it: a string or an integer
        "eventType": event.event_type,
        "appUid": app_uid,
        "agentUid": created.agent_uid,
        "threadUid": created.thread_uid,
        "humanUid": created.human_uid,
        "deepLink": deep_link,
        "createdAt": utc_now_iso(),
        "attempts": created.attempts,
        "latencyMs": round(created.latency_ms, 1),
        "source": {"topic": src.topic, "partition": src.partition, "offset": src.offset},
    }
    headers: Headers = (
        # whole: the id is bounded by dedup.max_event_id_length (characters), and 256 of
        # them can be 1,024 bytes; a cut id correlates the result with another event
        ("event-id", event.event_id.encode("utf-8", "replace")),
        ("correlation-id", header_text(event.correlation_id)),
    )
    if forward_headers:
        headers += tuple(h for h in src.headers if h[0].lower() in forward_headers)
    return OutRecord(topic, user_key.encode(), dumps_result(value), headers)


_BIG_INT = "\x00event-id\x00"  # stands for the digits of an integer id beyond 64 bits


def loads_result(raw: bytes) -> dict[str, Any]:
    """A result record's value read back (to cut it down): orjson reads an integer id
    beyond 64 bits as a float, so such an id is read again exactly (``_exact_number``)."""
    value: dict[str, Any] = orjson.loads(raw)
    if isinstance(value.get("eventId"), float):
        exact = json.loads(raw).get("eventId")
        if isinstance(exact, int) and not isinstance(exact, bool):
            value["eventId"] = exact
    return value


def dumps_result(value: dict[str, Any]) -> bytes:
    """orjson encodes integers of 64 bits at most: a longer integer id is written as its
    own digits in the place of a placeholder."""
    event_id = value.get("eventId")
    if not isinstance(event_id, int) or -(2**63) <= event_id < 2**64:
        return orjson.dumps(value)
    # the first occurrence is the id's: ``eventId`` comes before every other string field
    placeholder = orjson.dumps(_BIG_INT)
    encoded = orjson.dumps({**value, "eventId": _BIG_INT})
    return encoded.replace(placeholder, str(event_id).encode(), 1)


def dead_letter_record(
    topic: str,
    record: InputRecord,
    error: EventRejected,
    *,
    attempts: int = 0,
    event_id: str | None = None,
    first_seen_ms: int | None = None,
) -> OutRecord:
    """The original key, value and headers untouched, plus ``dlq-*`` headers saying why.

    The original headers are the producer's bytes and are copied as they are; the ``dlq-*``
    headers are the connector's and are valid UTF-8 of at most 1,000 bytes each."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    extra: list[tuple[str, bytes]] = [
        ("dlq-stage", header_text(error.stage.value)),
        ("dlq-code", header_text(error.code)),
        ("dlq-reason", header_text(error.reason)),
        ("dlq-attempts", str(attempts).encode()),
        ("dlq-source", header_text(f"{record.topic}/{record.partition}/{record.offset}")),
        # the original record's time: a redrive gives it back to the copy (the event's age)
        ("dlq-source-timestamp-ms", str(record.timestamp_ms).encode()),
        ("dlq-first-seen-ms", str(first_seen_ms or now_ms).encode()),
        ("dlq-failed-at-ms", str(now_ms).encode()),
    ]
    if error.status is not None:
        extra.append(("dlq-http-status", str(error.status).encode()))
    if event_id is not None:
        extra.append(("dlq-event-id", header_text(event_id)))
    return OutRecord(topic, record.key, record.value, record.headers + tuple(extra))
