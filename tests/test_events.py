"""connector.events: parsing input records, and the result and dead-letter records."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson
import pytest

from connector.errors import EventRejected, Stage
from connector.events import (
    Event,
    InputRecord,
    ThreadCreated,
    dead_letter_record,
    lookup,
    parse_event,
    result_record,
)

RESULT_FIELDS = {
    "schemaVersion",
    "eventId",
    "eventType",
    "appUid",
    "agentUid",
    "threadUid",
    "humanUid",
    "deepLink",
    "createdAt",
    "attempts",
    "latencyMs",
    "source",
}


def record(
    value: Any = None,
    *,
    raw: bytes | None = None,
    headers: tuple[tuple[str, bytes], ...] = (),
    key: bytes | None = b"rec-key",
) -> InputRecord:
    payload = raw if raw is not None else (None if value is None else orjson.dumps(value))
    return InputRecord("orders", 3, 42, key, payload, headers, timestamp_ms=1_700_000_000_000)


def parse(rec: InputRecord, id_field: str = "id", max_len: int = 256) -> Event:
    return parse_event(
        rec, id_field=id_field, id_header="event-id", type_field="type", max_id_length=max_len
    )


def rejected(rec: InputRecord, max_len: int = 256) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse(rec, max_len=max_len)
    return info.value


# -- parse_event ---------------------------------------------------------------------------


def test_parses_a_valid_event() -> None:
    body = {"id": "evt-1", "type": "order.shipped", "data": {"orderId": "o-9"}}
    rec = record(body)

    event = parse(rec)

    assert event.event_id == "evt-1"
    assert event.event_type == "order.shipped"
    assert event.body == body
    assert event.record is rec


def test_each_event_gets_its_own_correlation_id() -> None:
    rec = record({"id": "e", "type": "t"})
    assert parse(rec).correlation_id != parse(rec).correlation_id


def test_invalid_json_is_a_parse_error() -> None:
    exc = rejected(record(raw=b'{"id": "e", '))
    assert exc.stage is Stage.PARSE
    assert exc.code == "invalid_json"


@pytest.mark.parametrize("value", [b"[1, 2]", b'"text"', b"3", b"null", b"true"])
def test_json_that_is_not_an_object_is_rejected(value: bytes) -> None:
    exc = rejected(record(raw=value))
    assert exc.stage is Stage.PARSE
    assert exc.code == "not_an_object"


def test_tombstone_is_rejected() -> None:
    exc = rejected(record(None))
    assert exc.stage is Stage.PARSE
    assert exc.code == "empty_value"


def test_id_from_a_nested_field() -> None:
    event = parse(record({"meta": {"eventId": "nested-1"}, "type": "t"}), id_field="meta.eventId")
    assert event.event_id == "nested-1"


def test_id_falls_back_to_the_header() -> None:
    rec = record({"type": "t"}, headers=(("other", b"x"), ("Event-ID", b"  hdr-1  ")))
    assert parse(rec).event_id == "hdr-1"  # case-insensitive name, value stripped


def test_id_headers_that_disagree_are_ambiguous() -> None:
    """With the last one winning, the same pair in the other order was another event."""
    for pair in ((b"first", b"second"), (b"second", b"first")):
        rec = record({"type": "t"}, headers=(("event-id", pair[0]), ("Event-Id", pair[1])))
        exc = rejected(rec)
        assert (exc.stage, exc.code) == (Stage.VALIDATE, "ambiguous_event_id")


def test_id_headers_that_agree_are_one_id() -> None:
    rec = record({"type": "t"}, headers=(("event-id", b"same"), ("event-id", b" same ")))
    assert parse(rec).event_id == "same"


def test_id_headers_are_not_read_when_the_body_has_the_id() -> None:
    rec = record({"id": "body", "type": "t"}, headers=(("event-id", b"a"), ("event-id", b"b")))
    assert parse(rec).event_id == "body"


@pytest.mark.parametrize(
    "digits",
    [
        "1000000000000000000000000000000",
        "-1000000000000000000000000000000",
        "18446744073709551616",  # one over u64
        "123456789012345678901234567890123456789",
    ],
)
def test_an_integer_id_beyond_64_bits_keeps_its_digits(digits: str) -> None:
    """orjson reads such an integer as a float; the id is the input's own digits."""
    rec = record(raw=b'{"type": "t", "id": ' + digits.encode() + b"}")
    event = parse(rec)
    assert event.id_value == int(digits)
    assert event.event_id == digits
    assert event.dedup_key == digits
    created = ThreadCreated("th-1", "hu-1", "agent-x", 1, 1.0)
    out = result_record("r", event, app_uid="a", created=created, deep_link="d", user_key="k")
    assert b'"eventId":' + digits.encode() + b"," in (out.value or b"")
    assert json.loads(out.value or b"")["eventId"] == int(digits)
    assert dict(out.headers)["event-id"] == digits.encode()


@pytest.mark.parametrize("literal", [b"1e30", b"1.0", b"100000000000000000000000.5", b"-1e19"])
def test_a_float_literal_is_still_refused(literal: bytes) -> None:
    exc = rejected(record(raw=b'{"type": "t", "id": ' + literal + b"}"))
    assert exc.code == "invalid_event_id"


def test_an_integer_id_and_a_string_of_its_digits_differ_beyond_64_bits() -> None:
    big = "1000000000000000000000000000000"
    as_int = parse(record(raw=b'{"type": "t", "id": ' + big.encode() + b"}"))
    as_str = parse(record({"type": "t", "id": big}))
    assert as_int.dedup_key != as_str.dedup_key


@pytest.mark.parametrize("value", [b"", b"  \n\t "])
def test_an_empty_value_is_empty_value(value: bytes) -> None:
    exc = rejected(record(raw=value))
    assert (exc.stage, exc.code) == (Stage.PARSE, "empty_value")


def test_id_field_takes_precedence_over_the_header() -> None:
    rec = record({"id": "from-body", "type": "t"}, headers=(("event-id", b"from-header"),))
    assert parse(rec).event_id == "from-body"


@pytest.mark.parametrize(
    "headers",
    [(), (("event-id", b""),), (("event-id", b"   "),), (("trace-id", b"x"),)],
)
def test_missing_id_is_a_validation_error(headers: tuple[tuple[str, bytes], ...]) -> None:
    exc = rejected(record({"type": "t"}, headers=headers))
    assert exc.stage is Stage.VALIDATE
    assert exc.code == "no_event_id"


@pytest.mark.parametrize("bad_id", [True, 1.5, 5.0, {"x": 1}, ["a"], None, ""])
def test_an_id_that_is_not_a_string_or_an_integer_is_invalid(bad_id: Any) -> None:
    """Coerced to text, 5.0 or true would collide with other events: a dead letter, even
    when a header could stand in (which of the two was meant is not ours to guess)."""
    exc = rejected(record({"id": bad_id, "type": "t"}))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_event_id")
    with_header = record({"id": bad_id, "type": "t"}, headers=(("event-id", b"h-2"),))
    assert rejected(with_header).code == "invalid_event_id"


def test_an_integer_id_and_its_digits_as_a_string_are_different_events() -> None:
    as_int, as_str = parse(record({"id": 5, "type": "t"})), parse(record({"id": "5", "type": "t"}))
    assert as_int.event_id == as_str.event_id == "5"  # the text form (headers, logs)
    assert (as_int.id_value, as_str.id_value) == (5, "5")
    assert (as_int.dedup_key, as_str.dedup_key) == ("5", '"5"')


def test_an_id_over_the_length_limit_is_invalid() -> None:
    ok = record({"id": "x" * 256, "type": "t"})
    assert parse(ok).event_id == "x" * 256
    exc = rejected(record({"id": "x" * 10_000, "type": "t"}))
    assert exc.code == "invalid_event_id"
    assert "x" * 100 not in exc.reason
    assert rejected(record({"id": 10**15, "type": "t"}), max_len=10).code == ("invalid_event_id")


def test_a_header_id_is_a_string_and_must_be_utf8() -> None:
    event = parse(record({"type": "t"}, headers=(("event-id", b"5"),)))
    assert (event.id_value, event.dedup_key) == ("5", '"5"')
    bad = record({"type": "t"}, headers=(("event-id", b"\xff\xfe"),))
    assert rejected(bad).code == "invalid_event_id"


def test_numeric_id_and_type_become_strings() -> None:
    event = parse(record({"id": 12345, "type": 7}))
    assert event.event_id == "12345"
    assert event.event_type == "7"


@pytest.mark.parametrize("body", [{"id": "e"}, {"id": "e", "type": ""}, {"id": "e", "type": None}])
def test_missing_type_is_a_validation_error(body: dict[str, Any]) -> None:
    exc = rejected(record(body))
    assert exc.stage is Stage.VALIDATE
    assert exc.code == "no_event_type"


def test_lookup_follows_dotted_paths_and_list_indexes() -> None:
    body = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert lookup(body, "a.b.1.c") == 2
    for path in ("a.x", "a.b.5.c", "a.b.c", "a.b.1.c.d"):
        with pytest.raises(KeyError):
            lookup(body, path)


# -- result_record -------------------------------------------------------------------------

SECRET_TEXT = "confidential-system-prompt-text"


def make_event() -> Event:
    body = {"id": "evt-7", "type": "order.shipped", "data": {"note": SECRET_TEXT}}
    return parse(record(body))


def test_result_record_fields() -> None:
    event = make_event()
    created = ThreadCreated(
        thread_uid="th-1", human_uid="hu-1", agent_uid="agent-x", attempts=2, latency_ms=123.456
    )

    out = result_record(
        "thread-results",
        event,
        app_uid="demo-app",
        created=created,
        deep_link="https://app/agent?thread=th-1",
        user_key="externalUserId:cust-1",
    )

    assert out.topic == "thread-results"
    assert out.key == b"externalUserId:cust-1"
    assert out.partition is None
    value = orjson.loads(out.value or b"")
    assert set(value) == RESULT_FIELDS
    assert value["schemaVersion"] == 1
    assert value["eventId"] == "evt-7"
    assert value["eventType"] == "order.shipped"
    assert value["appUid"] == "demo-app"
    assert value["agentUid"] == "agent-x"
    assert value["threadUid"] == "th-1"
    assert value["humanUid"] == "hu-1"
    assert value["deepLink"] == "https://app/agent?thread=th-1"
    assert value["attempts"] == 2
    assert value["latencyMs"] == 123.5
    assert value["source"] == {"topic": "orders", "partition": 3, "offset": 42}
    assert value["createdAt"].endswith("Z")
    datetime.fromisoformat(value["createdAt"].replace("Z", "+00:00"))
    assert dict(out.headers) == {
        "event-id": b"evt-7",
        "correlation-id": event.correlation_id.encode(),
    }


def test_result_record_carries_no_event_body() -> None:
    """The system message is rendered from the body: none of it may reach the results."""
    created = ThreadCreated("th-1", "hu-1", "agent-x", 1, 1.0)
    out = result_record(
        "r", make_event(), app_uid="a", created=created, deep_link="d", user_key="humanUid:h"
    )
    assert SECRET_TEXT.encode() not in (out.value or b"")
    assert all(SECRET_TEXT.encode() not in value for _, value in out.headers)


# -- dead_letter_record --------------------------------------------------------------------


def test_dead_letter_keeps_the_original_record() -> None:
    original_headers = (("event-id", b"e-1"), ("trace", b"t-1"))
    rec = InputRecord("orders", 1, 99, b"the-key", b"not json", original_headers)
    error = EventRejected(Stage.PARSE, "value is not valid JSON", code="invalid_json")

    out = dead_letter_record("thread-dead-letters", rec, error, attempts=0)

    assert out.topic == "thread-dead-letters"
    assert out.key == b"the-key"
    assert out.value == b"not json"
    assert out.headers[: len(original_headers)] == original_headers
    dlq = dict(out.headers[len(original_headers) :])
    assert dlq["dlq-stage"] == b"parse"
    assert dlq["dlq-code"] == b"invalid_json"
    assert dlq["dlq-reason"] == b"value is not valid JSON"
    assert dlq["dlq-attempts"] == b"0"
    assert dlq["dlq-source"] == b"orders/1/99"
    assert int(dlq["dlq-failed-at-ms"]) > 1_600_000_000_000
    assert int(dlq["dlq-first-seen-ms"]) > 1_600_000_000_000
    assert "dlq-http-status" not in dlq
    assert "dlq-event-id" not in dlq


def test_dead_letter_for_an_api_failure() -> None:
    rec = record({"id": "e-5", "type": "t"})
    error = EventRejected(Stage.API, "HTTP 422: nope", code="http_422", status=422)

    out = dead_letter_record(
        "dlq", rec, error, attempts=3, event_id="e-5", first_seen_ms=1_700_000_000_123
    )

    dlq = dict(out.headers)
    assert dlq["dlq-stage"] == b"api"
    assert dlq["dlq-code"] == b"http_422"
    assert dlq["dlq-http-status"] == b"422"
    assert dlq["dlq-attempts"] == b"3"
    assert dlq["dlq-event-id"] == b"e-5"
    assert dlq["dlq-first-seen-ms"] == b"1700000000123"
    assert dlq["dlq-source-timestamp-ms"] == str(rec.timestamp_ms).encode()  # for a redrive


def test_dead_letter_of_a_tombstone_and_a_long_reason() -> None:
    rec = InputRecord("orders", 0, 1, None, None)
    error = EventRejected(Stage.PARSE, "x" * 5000, code="empty_value")

    out = dead_letter_record("dlq", rec, error)

    assert out.key is None
    assert out.value is None
    assert 0 < len(dict(out.headers)["dlq-reason"]) <= 1000


def test_a_results_event_id_header_holds_the_whole_id() -> None:
    """An id within ``dedup.max_event_id_length`` (256 characters) can be 1,024 bytes of
    UTF-8; the result's ``event-id`` header was cut at 1,000, so a consumer correlating by
    it got another id (and two ids sharing 1,000 bytes got the same one)."""
    event_id = "\U0001f600" * 256
    event = parse(record({"id": event_id, "type": "order.shipped"}))
    created = ThreadCreated("th-1", "hu-1", "agent-x", attempts=1, latency_ms=1.0)
    out = result_record("r", event, app_uid="a", created=created, deep_link="d", user_key="k")
    assert dict(out.headers)["event-id"].decode() == event_id


@pytest.mark.parametrize("length", [309, 400, 1000])
def test_an_integer_id_past_the_float_range_is_an_id(length: int) -> None:
    """orjson refuses an integer of 309 digits or more ("number is infinity when parsed as
    double"): the event was ``invalid_json``, while 300 digits made an id."""
    digits = "9" * length
    rec = record(raw=b'{"type": "t", "id": ' + digits.encode() + b', "n": 1}')
    event = parse(rec, max_len=1000)
    assert event.id_value == int(digits)
    assert event.event_id == digits
    assert event.body["n"] == 1
    assert rejected(rec).code == "invalid_event_id"  # over the default 256 characters


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "t", "id": 1, "x": 1e400}',  # a float past the range stays invalid
        b'{"type": "t", "id": ' + b"9" * 400 + b', "x": NaN}',
        b'{"type": "t", "id": ' + b"9" * 400 + b', "x": "\\ud800"}',  # a lone surrogate
        b'{"type": "t", "id": ' + b"9" * 400 + b", }",
    ],
)
def test_what_orjson_refuses_beside_a_long_integer_stays_invalid_json(raw: bytes) -> None:
    assert rejected(record(raw=raw), max_len=1000).code == "invalid_json"


def test_a_long_integer_in_another_field_stays_invalid_json() -> None:
    rec = record(raw=b'{"type": "t", "id": 1, "n": ' + b"9" * 400 + b"}")
    assert rejected(rec).code == "invalid_json"


def test_result_record_forwards_only_the_allowed_headers() -> None:
    headers = (("traceparent", b"00-abc"), ("X-Tenant", b"a"), ("x-tenant", b"b"), ("secret", b"s"))
    event = parse(record({"id": "e", "type": "t"}, headers=headers))
    created = ThreadCreated("th", "hu", "ag", 1, 1.0)
    out = result_record(
        "r",
        event,
        app_uid="a",
        created=created,
        deep_link="d",
        user_key="k",
        forward_headers=frozenset({"traceparent", "x-tenant"}),
    )
    assert out.headers[2:] == (("traceparent", b"00-abc"), ("X-Tenant", b"a"), ("x-tenant", b"b"))
    plain = result_record("r", event, app_uid="a", created=created, deep_link="d", user_key="k")
    assert [name for name, _ in plain.headers] == ["event-id", "correlation-id"]


def test_a_given_correlation_id_is_kept() -> None:
    event = parse_event(
        record({"id": "e", "type": "t"}),
        id_field="id",
        id_header="event-id",
        type_field="type",
        correlation_id="req-1",
    )
    assert event.correlation_id == "req-1"
