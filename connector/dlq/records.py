"""A dead letter read back from its topic, the filters of the ``dlq`` commands, and a safe
way to show bytes nobody vetted (truncated, control and binary bytes escaped).

Pure: no I/O. The ``dlq-*`` headers are the ones ``events.dead_letter_record`` writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from connector.events import Headers, lookup

DLQ_HEADER_PREFIX = "dlq-"
REDRIVE_COUNT_HEADER = "dlq-redrive-count"
REDRIVEN_FROM_HEADER = "dlq-redriven-from"

# Codes a redrive cannot fix without a change to the record itself (or, for ``expired``,
# to the route's max_event_age_s): copying them back would only dead-letter them again,
# or send a stale message. A redrive skips them unless ``--code`` names them.
NOT_REDRIVABLE_BY_DEFAULT = frozenset(
    {
        "empty_value",
        "invalid_json",
        "not_an_object",
        "no_event_id",
        "invalid_event_id",
        "ambiguous_event_id",
        "no_event_type",
        "invalid_request",
        "invalid_identifier",
        "oversize",
        "invalid_event_time",
        "expired",
    }
)


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where the dead-lettered record was consumed (the ``dlq-source`` header)."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def parse(cls, text: str) -> SourceRef | None:
        topic, sep, rest = text.rpartition("/")
        topic, sep2, partition = topic.rpartition("/")
        if not (sep and sep2 and topic and partition.isdigit() and rest.isdigit()):
            return None
        return cls(topic, int(partition), int(rest))

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, with its ``dlq-*`` headers decoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    stage: str = ""
    code: str = ""
    reason: str = ""
    event_id: str | None = None
    event_type: str | None = None
    source: SourceRef | None = None
    failed_at_ms: int = 0
    source_timestamp_ms: int | None = None
    redrive_count: int = 0

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def failed_at(self) -> datetime:
        return datetime.fromtimestamp(self.failed_at_ms / 1000, UTC)

    def original_headers(self) -> Headers:
        """The headers the record had before it was dead-lettered (no ``dlq-*``)."""
        return tuple((k, v) for k, v in self.headers if not k.lower().startswith(DLQ_HEADER_PREFIX))

    @classmethod
    def from_kafka(
        cls,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]],
        *,
        type_field: str = "type",
    ) -> DeadLetter:
        hs: Headers = tuple((k, bytes(v) if v is not None else b"") for k, v in headers)
        text = {k.lower(): v.decode("utf-8", "replace") for k, v in hs}  # last one wins
        source = SourceRef.parse(text["dlq-source"]) if "dlq-source" in text else None
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            key=key,
            value=value,
            headers=hs,
            stage=text.get("dlq-stage", ""),
            code=text.get("dlq-code", ""),
            reason=text.get("dlq-reason", ""),
            event_id=text.get("dlq-event-id"),
            event_type=_event_type(value, type_field),
            source=source,
            failed_at_ms=_ms(_int(text.get("dlq-failed-at-ms"))) or _ms(timestamp_ms) or 0,
            source_timestamp_ms=_ms(_int(text.get("dlq-source-timestamp-ms"))),
            redrive_count=_int(text.get(REDRIVE_COUNT_HEADER)) or 0,
        )


MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant datetime shows


def _ms(ms: int | None) -> int | None:
    """A time in epoch ms, or None when it is no time a record can carry or a datetime can
    show: a header of 20 digits made ``dlq inspect`` crash (OverflowError) on the whole
    topic, and ``dlq redrive`` crash copying it as the record's timestamp, every rerun."""
    return ms if ms is not None and 0 <= ms <= MAX_MS else None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _event_type(value: bytes | None, type_field: str) -> str | None:
    if not value:
        return None
    try:
        body = orjson.loads(value)
        found = lookup(body, type_field) if isinstance(body, dict) else None
    except (orjson.JSONDecodeError, KeyError):
        return None
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command looks at; an empty set matches everything."""

    codes: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    max_redrives: int | None = None

    def matches(self, dl: DeadLetter) -> bool:
        return (
            (not self.codes or dl.code in self.codes)
            and (not self.stages or dl.stage in self.stages)
            and (not self.event_types or dl.event_type in self.event_types)
            and (
                not self.source_topics
                or (dl.source is not None and dl.source.topic in self.source_topics)
            )
            and (self.since_ms is None or dl.failed_at_ms >= self.since_ms)
            and (self.until_ms is None or dl.failed_at_ms < self.until_ms)
            and (self.max_redrives is None or dl.redrive_count < self.max_redrives)
        )

    def describe(self) -> dict[str, Any]:
        """The filter as plain data (for ``--json`` and log lines)."""
        return {
            "codes": sorted(self.codes),
            "stages": sorted(self.stages),
            "eventTypes": sorted(self.event_types),
            "sourceTopics": sorted(self.source_topics),
            "since": _iso(self.since_ms),
            "until": _iso(self.until_ms),
            "maxRedrives": self.max_redrives,
        }


def _iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(ms)


def iso_ms(ms: int) -> str:
    ms = min(max(ms, 0), MAX_MS)  # a Kafka timestamp is any int64
    stamp = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: datetime | None = None) -> int:
    """Epoch ms from ``2026-11-27``, ``2026-11-27T08:00:00Z`` or a duration ago (``6h``,
    ``2d``); ValueError otherwise. A time without a zone is UTC."""
    text = text.strip()
    if len(text) > 1 and text[-1] in _UNITS and text[:-1].isdigit():
        try:
            ago = timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
            return int(((now or datetime.now(UTC)) - ago).timestamp() * 1000)
        except OverflowError:  # ``99999999999d``: before year 1, not a traceback
            raise ValueError(f"{text!r} reaches before the year 1") from None
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def safe_text(data: bytes | None, max_bytes: int) -> tuple[str, bool]:
    """Bytes as printable text: at most ``max_bytes`` of them, invalid UTF-8 as ``\\xNN``,
    control characters (terminal escapes included) escaped. Returns (text, truncated)."""
    if data is None:
        return "(null)", False
    truncated = len(data) > max_bytes
    text = data[:max_bytes].decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else _escape(c) for c in text), truncated


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
