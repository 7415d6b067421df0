"""Outcome records that always fit: sizes as Kafka counts them, UTF-8-safe cuts, bounded
dead letters and results (issue 9)."""

from __future__ import annotations

import hashlib
import random

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from connector.bounds import (
    HEADROOM,
    RESULT_FIELD_MAX,
    bound,
    bounded_dead_letter,
    bounded_result,
    minimal_dead_letter,
    out_size,
    record_size,
)
from connector.errors import EventRejected, Stage
from connector.events import InputRecord, OutRecord, dead_letter_record, dumps_result
from connector.utf8 import cut_utf8, header_text

LIMIT = 1_048_576


def headers_of(record: OutRecord) -> dict[str, bytes]:
    return dict(record.headers)


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (None, None, []),
        (b"k", b"v" * 200, [("a", b"1")]),
        (b"k" * 300, b"v" * 70_000, [("h" * 130, b"x" * 20_000), ("n", None)]),
        (None, b"x" * 2_000_000, [("dlq-\u00e9", "\u00e9".encode())]),
    ],
)
def test_record_size_is_what_aiokafka_counts(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    expected = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    assert record_size(key, value, headers) == expected


@pytest.mark.parametrize("text", ["\u00e9" * 600, "a" + "\u20ac" * 400, "\U0001f600" * 300])
def test_cut_never_splits_a_character(text: str) -> None:
    for limit in range(990, 1004):
        cut = cut_utf8(text.encode(), limit)
        assert len(cut) <= limit
        assert text.startswith(cut.decode("utf-8"))  # valid, and a prefix
        assert len(cut) > limit - 4


def test_header_text_is_valid_utf8_even_from_a_lone_surrogate() -> None:
    assert header_text("a\ud800b") == b"a?b"
    assert header_text("x" * 5000) == b"x" * 1000


def test_dlq_reason_cut_at_1000_bytes_is_valid_utf8() -> None:
    record = InputRecord("in", 0, 7, b"k", b"v", (("bin", b"\xff\xfe"),))
    reason = "x" + "\u00e9" * 700  # byte 1000 falls inside a character
    dlq = dead_letter_record("dlq", record, EventRejected(Stage.PARSE, reason, code="c"))
    h = headers_of(dlq)
    assert len(h["dlq-reason"]) <= 1000
    assert reason.startswith(h["dlq-reason"].decode("utf-8"))
    assert h["bin"] == b"\xff\xfe"  # the original's bytes, as they are


def dead_letter(value: bytes | None, key: bytes | None = b"key", headers=()) -> OutRecord:
    record = InputRecord("in", 2, 41, key, value, tuple(headers))
    return dead_letter_record(
        "dlq", record, EventRejected(Stage.PARSE, "not JSON", code="invalid_json")
    )


@pytest.mark.parametrize("size", [1_048_400, 1_048_576, 2_000_000, 5_000_000])
def test_oversize_dead_letter_is_truncated_to_fit_with_hash_and_size(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + b"\x00" * (size % 256)
    dlq = dead_letter(value, headers=[("trace", b"t-1")])
    assert out_size(dlq) > LIMIT
    out = bound(dlq, LIMIT, "truncate", results_topic="res", dead_topic="dlq")
    assert out is not None and out_size(out) <= LIMIT
    h = headers_of(out)
    assert h["dlq-value-bytes"] == str(size).encode()
    assert h["dlq-value-sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert h["dlq-value-cut"] == b"truncated"
    assert h["dlq-source"] == b"in/2/41" and h["dlq-code"] == b"invalid_json"
    assert h["trace"] == b"t-1" and out.key == b"key"
    assert out.value is not None and value.startswith(out.value)
    assert len(out.value) > LIMIT - 4096  # cut at a safe size, not thrown away


def test_omit_leaves_the_value_out() -> None:
    dlq = dead_letter(b"x" * 2_000_000)
    out = bounded_dead_letter(dlq, LIMIT, "omit")
    assert out.value == b"" and headers_of(out)["dlq-value-cut"] == b"omitted"
    assert out_size(out) < 2000


def test_huge_original_headers_are_dropped_largest_first_and_counted() -> None:
    headers = [("small", b"s"), ("big", b"b" * 900_000), ("bigger", b"B" * 1_000_000)]
    dlq = dead_letter(b"{}", headers=headers)
    out = bound(dlq, LIMIT, "truncate", results_topic="res", dead_topic="dlq")
    assert out is not None and out_size(out) <= LIMIT
    h = headers_of(out)
    assert h["small"] == b"s" and h["big"] == b"b" * 900_000
    assert "bigger" not in h and h["dlq-headers-dropped"] == b"1"


def _one_at_a_time(
    key: bytes | None, headers: list[tuple[str, bytes]], own: list[tuple[str, bytes]], budget: int
) -> tuple[list[tuple[str, bytes]], int]:
    """The reference: drop the largest header and measure the whole record again."""
    kept, dropped, marker = list(headers), 0, []
    while kept and record_size(key, b"", [*own, *kept, *marker]) > budget:
        largest = max(range(len(kept)), key=lambda i: len(kept[i][0]) + len(kept[i][1]))
        del kept[largest]
        dropped += 1
        marker = [("dlq-headers-dropped", str(dropped).encode())]
    return kept, dropped


@pytest.mark.parametrize("seed", range(40))
def test_headers_dropped_as_one_at_a_time_would(seed: int) -> None:
    """Each header measured once, the largest dropped first: the same headers kept as
    dropping one at a time and measuring again (ties, count varints, the marker)."""
    rng = random.Random(seed)
    n = rng.choice([1, 5, 130, 300])
    headers = [
        (rng.choice(["h", "x-id", "é" * rng.randint(0, 3)]), b"v" * rng.choice([0, 1, 2, 200]))
        for _ in range(n)
    ]
    dlq = dead_letter(b"{}", headers=headers)
    total = out_size(dlq)
    limit = rng.randint(total // 3, total) + HEADROOM
    out = bounded_dead_letter(dlq, limit, "omit")

    own = [h for h in out.headers if h[0].startswith("dlq-") and h[0] != "dlq-headers-dropped"]
    kept, dropped = _one_at_a_time(out.key, headers, own, limit - HEADROOM)
    assert [h for h in out.headers if not h[0].startswith("dlq-")] == kept
    marker = headers_of(out).get("dlq-headers-dropped")
    assert marker == (str(dropped).encode() if dropped else None)


def test_a_flood_of_tiny_headers_is_cut_to_fit() -> None:
    """524,000 one-byte headers fit in a 1 MiB record; dropping them one at a time, the
    whole record measured after each, held the event loop for 109 s."""
    headers = [("", b"x")] * 524_000
    dlq = dead_letter(b"not json", headers=headers)
    out = bounded_dead_letter(dlq, 200_000, "truncate")
    assert out_size(out) <= 200_000
    dropped = int(headers_of(out)["dlq-headers-dropped"])
    assert dropped + sum(1 for h in out.headers if h[0] == "") == 524_000


def test_huge_key_is_dropped_with_its_hash() -> None:
    key = b"k" * 1_500_000
    out = bound(dead_letter(b"{}", key=key), LIMIT, "truncate", results_topic="r", dead_topic="dlq")
    assert out is not None and out.key is None and out_size(out) <= LIMIT
    h = headers_of(out)
    assert h["dlq-key-bytes"] == b"1500000"
    assert h["dlq-key-sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert out.value == b"{}"


def test_a_record_that_fits_is_left_alone() -> None:
    dlq = dead_letter(b"x" * 1000)
    assert bound(dlq, LIMIT, "truncate", results_topic="r", dead_topic="dlq") is dlq


def result(event_id: str, deep_link: str) -> OutRecord:
    body = {
        "schemaVersion": 1,
        "eventId": event_id,
        "appUid": "app",
        "threadUid": "t-1",
        "deepLink": deep_link,
        "source": {"topic": "in", "partition": 0, "offset": 3},
    }
    return OutRecord("res", b"externalUserId:u", orjson.dumps(body), (("event-id", b"e"),))


def test_oversize_result_stays_valid_json_with_cut_fields() -> None:
    link = "https://x/" + "\u00e9" * 700_000
    out = bound(result("e-1", link), LIMIT, "truncate", results_topic="res", dead_topic="dlq")
    assert out is not None and out_size(out) <= LIMIT
    body = orjson.loads(out.value or b"")
    assert body["threadUid"] == "t-1" and body["eventId"] == "e-1"
    assert link.startswith(body["deepLink"])
    assert len(body["deepLink"].encode()) <= RESULT_FIELD_MAX
    raw = link.encode()
    assert body["truncated"] == {
        "deepLink": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    }
    assert out.key == b"externalUserId:u"


def test_an_oversize_changelog_record_is_left_out() -> None:
    record = OutRecord("changelog", b"k" * 2_000_000, b"{}")
    assert bound(record, LIMIT, "truncate", results_topic="r", dead_topic="d") is None


def test_minimal_dead_letter_keeps_coordinates_and_hash() -> None:
    dlq = dead_letter(b"x" * 10)
    out = minimal_dead_letter(dlq, "refused")
    h = headers_of(out)
    assert h["dlq-source"] == b"in/2/41" and h["dlq-value-bytes"] == b"10"
    assert h["dlq-value-sha256"] == hashlib.sha256(b"x" * 10).hexdigest().encode()
    assert out.key is None and out.value == b""


@pytest.mark.parametrize("event_id", [10**30, -(10**40), 2**64])
def test_a_bounded_result_keeps_an_integer_id_of_any_length(event_id: int) -> None:
    """orjson reads an integer beyond 64 bits as a float: the cut result said
    ``"eventId":1e+30`` (and 10**30 + 1 said the same)."""
    value = {
        "schemaVersion": 1,
        "eventId": event_id,
        "deepLink": "x" * (RESULT_FIELD_MAX + 100),
        "threadUid": "t-1",
    }
    record = OutRecord("results", b"k", dumps_result(value), ())
    bounded = bounded_result(record, 1024 * 1024)
    assert f'"eventId":{event_id},'.encode() in bounded.value
    assert len(orjson.loads(bounded.value)["deepLink"]) == RESULT_FIELD_MAX
