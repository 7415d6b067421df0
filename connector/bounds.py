"""Outcome records that always fit: Kafka's size of a record, safe header text, and the
bounded forms of dead letters and results.

One record too large for the producer (``kafka.max_request_size``) used to fail the send,
abort the commit cycle, restart the session and replay the cycle for ever (issue 9). Here
every outcome record is measured the way Kafka counts it *before* it is sent, and one that
does not fit is replaced by a bounded form:

- a dead letter keeps its ``dlq-*`` headers; its value is cut at a safe size
  (``kafka.oversize_value: truncate``) or left out (``omit``); ``dlq-value-bytes`` and
  ``dlq-value-sha256`` describe the original value and ``dlq-source`` (topic/partition/
  offset) finds it on the input topic. Original headers that do not fit are dropped, largest
  first (``dlq-headers-dropped`` counts them); a key that does not fit is dropped too
  (``dlq-key-bytes``, ``dlq-key-sha256``);
- a result stays a valid JSON result: its long string fields are cut and listed under
  ``"truncated"`` with their original size and SHA-256 (the thread exists: its result must be
  published);
- last resort, :func:`minimal_dead_letter`: coordinates and hash only.

Pure: no I/O. Every header value the connector writes goes through :func:`header_text`, so
it is valid UTF-8 and cut at a character boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

import orjson

from connector.events import OutRecord, dumps_result, loads_result
from connector.utf8 import HEADER_VALUE_MAX, cut_utf8, header_text

OversizeValue = Literal["truncate", "omit"]
# DefaultRecordBatch v2: the batch header (61 bytes, base offset and length included), and
# a record's worst-case overhead: length (varint, 5), attributes (1), timestamp delta
# (varint, 10), offset delta (varint, 5). A single record's batch is never larger.
BATCH_OVERHEAD = 61
RECORD_OVERHEAD = 21
RESULT_FIELD_MAX = 1024  # bytes, for a string field of a bounded result
HEADROOM = 1024  # bytes left free under the limit by a cut value


def varint_size(value: int) -> int:
    """Bytes of Kafka's zig-zag varint encoding of ``value``."""
    value = (value << 1) ^ (value >> 63)
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field_size(data: bytes | None) -> int:
    return 1 if data is None else varint_size(len(data)) + len(data)


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    """The upper bound Kafka (and aiokafka's ``send``) counts for one record in its own
    batch: key + value + headers + record overhead + batch header."""
    headers = list(headers)
    size = _field_size(key) + _field_size(value) + varint_size(len(headers))
    for name, data in headers:
        size += _header_size(name, data)
    return BATCH_OVERHEAD + RECORD_OVERHEAD + size


def out_size(record: OutRecord) -> int:
    return record_size(record.key, record.value, record.headers)


def sha256_hex(data: bytes | None) -> str:
    return hashlib.sha256(data or b"").hexdigest()


def fits(record: OutRecord, limit: int) -> bool:
    return out_size(record) <= limit


def bounded_dead_letter(
    record: OutRecord, limit: int, mode: OversizeValue, own_prefix: str = "dlq-"
) -> OutRecord:
    """The dead letter cut to fit ``limit`` (see the module docstring). Headers whose name
    starts with ``own_prefix`` are the connector's and are always kept."""
    own = [(k, v) for k, v in record.headers if k.startswith(own_prefix)]
    original = [(k, v) for k, v in record.headers if not k.startswith(own_prefix)]
    value = record.value
    own.append(("dlq-value-cut", b"omitted" if mode == "omit" else b"truncated"))
    if value is not None:
        own.append(("dlq-value-bytes", str(len(value)).encode()))
        own.append(("dlq-value-sha256", sha256_hex(value).encode()))
    key = record.key
    budget = limit - HEADROOM
    if key is not None and record_size(key, b"", own) > budget:
        own += [
            ("dlq-key-bytes", str(len(key)).encode()),
            ("dlq-key-sha256", sha256_hex(key).encode()),
        ]
        key = None
    kept, dropped = _drop_largest_headers(original, budget - record_size(key, b"", own), len(own))
    marker = [("dlq-headers-dropped", str(dropped).encode())] if dropped else []
    headers = (*kept, *own, *marker)
    if mode == "omit" or value is None:
        new_value: bytes | None = b"" if value is not None or key is None else None
    else:
        room = budget - record_size(key, b"", headers) - 5  # the value's own length varint
        new_value = cut_utf8(value, max(0, room))
    return OutRecord(record.topic, key, new_value, headers, record.partition)


def _drop_largest_headers(
    headers: list[tuple[str, bytes]], room: int, others: int
) -> tuple[list[tuple[str, bytes]], int]:
    """The headers left, in their order, once the largest are dropped until they (with a
    ``dlq-headers-dropped`` count) take at most ``room`` bytes beside ``others`` headers;
    and how many were dropped. Each header is measured once: dropping one at a time and
    measuring the whole record again took 109 s for 524,000 one-byte headers (a record
    that fits in 1 MiB), with the event loop held all that time."""
    sizes = [_header_size(name, data) for name, data in headers]
    # largest first; ties in their order (what taking the largest one at a time gave)
    order = sorted(
        range(len(headers)), key=lambda i: -(len(headers[i][0]) + len(headers[i][1] or b""))
    )
    kept_bytes = sum(sizes)
    gone: set[int] = set()
    for i in order:
        count = others + len(headers) - len(gone) + (1 if gone else 0)
        marker = _header_size("dlq-headers-dropped", str(len(gone)).encode()) if gone else 0
        # the count's own varint grows with the headers: measured against one header
        if varint_size(count) - varint_size(others) + kept_bytes + marker <= room:
            break
        gone.add(i)
        kept_bytes -= sizes[i]
    return [h for i, h in enumerate(headers) if i not in gone], len(gone)


def _header_size(name: str, data: bytes | None) -> int:
    encoded = name.encode("utf-8")
    return varint_size(len(encoded)) + len(encoded) + _field_size(data)


def bounded_result(record: OutRecord, limit: int) -> OutRecord:
    """The result record with every string field over :data:`RESULT_FIELD_MAX` bytes cut,
    and listed under ``"truncated"``; headers cut to :data:`HEADER_VALUE_MAX`."""
    body = loads_result(record.value or b"{}")  # an integer id of any length kept exact
    truncated: dict[str, dict[str, object]] = {}
    for name, field in list(body.items()):
        if isinstance(field, str) and len(field.encode("utf-8", "replace")) > RESULT_FIELD_MAX:
            raw = field.encode("utf-8", "replace")
            body[name] = cut_utf8(raw, RESULT_FIELD_MAX).decode("utf-8")
            truncated[name] = {"bytes": len(raw), "sha256": sha256_hex(raw)}
    body["truncated"] = truncated
    headers = tuple((k, cut_utf8(v or b"", HEADER_VALUE_MAX)) for k, v in record.headers)
    key = record.key
    if key is not None and len(key) > RESULT_FIELD_MAX:
        headers += (("key-sha256", sha256_hex(key).encode()),)
        key = cut_utf8(key, RESULT_FIELD_MAX)  # same truncated key, same partition
    bounded = OutRecord(record.topic, key, dumps_result(body), headers, record.partition)
    return bounded if fits(bounded, limit) else minimal_result(record, body)


def minimal_result(record: OutRecord, body: dict[str, object]) -> OutRecord:
    """Only the thread and where its event came from: always a few hundred bytes."""
    fields = ("schemaVersion", "appUid", "threadUid", "humanUid", "source")
    kept = {k: body[k] for k in fields if k in body}
    kept["truncated"] = {"all": {"bytes": len(record.value or b"")}}
    return OutRecord(record.topic, None, orjson.dumps(kept), (), record.partition)


def minimal_dead_letter(record: OutRecord, reason: str) -> OutRecord:
    """Last resort: the ``dlq-source``, stage and code headers and the value's hash only."""
    keep = ("dlq-stage", "dlq-code", "dlq-source", "dlq-event-id", "dlq-failed-at-ms")
    headers = [(k, cut_utf8(v or b"", 256)) for k, v in record.headers if k in keep]
    headers += [
        ("dlq-value-cut", b"omitted"),
        ("dlq-value-bytes", str(len(record.value or b"")).encode()),
        ("dlq-value-sha256", sha256_hex(record.value).encode()),
        ("dlq-produce-error", header_text(reason, 256)),
    ]
    return OutRecord(record.topic, None, b"", tuple(headers), record.partition)


def bound(
    record: OutRecord, limit: int, mode: OversizeValue, *, results_topic: str, dead_topic: str
) -> OutRecord | None:
    """``record`` itself if it fits ``limit``, else its bounded form; ``None`` for a record
    of another topic (a dedup changelog entry) that cannot be cut without losing its
    meaning: the caller drops it."""
    if fits(record, limit):
        return record
    if record.topic == dead_topic:
        bounded = bounded_dead_letter(record, limit, mode)
        return bounded if fits(bounded, limit) else minimal_dead_letter(record, "oversize")
    if record.topic == results_topic:
        return bounded_result(record, limit)
    return None


def all_fit(records: Sequence[OutRecord], limit: int) -> bool:
    return all(fits(r, limit) for r in records)
