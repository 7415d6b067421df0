"""connector.dlq.records and the pure parts of redrive: reading dead letters back, filters,
safe display, what a redrive copies, and its pacing."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from connector.dlq.plan import (
    ALREADY,
    COPY,
    FILTERED,
    NO_SOURCE,
    NOT_AN_INPUT,
    NOT_REDRIVABLE,
    Pacer,
    RedriveOptions,
    copy_of,
    decide,
)
from connector.dlq.records import DeadLetter, Filter, SourceRef, parse_when, safe_text
from connector.errors import EventRejected, Stage
from connector.events import InputRecord, dead_letter_record

INPUTS = frozenset({"orders"})


def dead(
    code: str = "no_route",
    stage: Stage = Stage.ROUTE,
    headers: tuple[tuple[str, bytes], ...] = (),
) -> DeadLetter:
    record = InputRecord(
        "orders",
        2,
        41,
        b"u-1",
        orjson.dumps({"id": "e-1", "type": "order.created"}),
        (("trace", b"t"), *headers),
        1_700_000_000_000,
    )
    out = dead_letter_record("dlq", record, EventRejected(stage, "why", code=code), event_id="e-1")
    return DeadLetter.from_kafka("dlq", 0, 7, 1_800_000_000_000, out.key, out.value, out.headers)


def test_reads_its_own_headers_back() -> None:
    dl = dead()
    assert (dl.stage, dl.code, dl.reason, dl.event_id) == ("route", "no_route", "why", "e-1")
    assert dl.source == SourceRef("orders", 2, 41)
    assert dl.event_type == "order.created"
    assert dl.source_timestamp_ms == 1_700_000_000_000
    assert dl.redrive_count == 0 and dl.coordinates == "dlq/0/7"
    assert dl.original_headers() == (("trace", b"t"),)


def test_source_ref_parses_topics_with_slashes_and_refuses_junk() -> None:
    assert SourceRef.parse("a/b/3/9") == SourceRef("a/b", 3, 9)
    assert SourceRef.parse("orders/x/9") is None
    assert SourceRef.parse("orders") is None


def test_copy_keeps_the_record_and_counts_redrives() -> None:
    copy = copy_of(dead(headers=(("dlq-redrive-count", b"2"),)))
    assert (copy.topic, copy.partition, copy.key) == ("orders", 2, b"u-1")
    assert copy.timestamp_ms == 1_700_000_000_000
    assert copy.headers == (
        ("trace", b"t"),
        ("dlq-redrive-count", b"3"),
        ("dlq-redriven-from", b"dlq/0/7"),
    )


def test_decide() -> None:
    opts = RedriveOptions()
    assert decide(dead(), True, opts, INPUTS) == COPY
    assert decide(dead(), False, opts, INPUTS) == ALREADY
    assert decide(dead(), False, RedriveOptions(again=True), INPUTS) == COPY
    assert decide(dead("invalid_json", Stage.PARSE), True, opts, INPUTS) == NOT_REDRIVABLE
    assert decide(dead("expired"), True, opts, INPUTS) == NOT_REDRIVABLE
    named = RedriveOptions(Filter(codes=frozenset({"expired"})))
    assert decide(dead("expired"), True, named, INPUTS) == COPY
    assert decide(dead(), True, named, INPUTS) == FILTERED
    assert decide(dead(), True, opts, frozenset({"other"})) == NOT_AN_INPUT
    no_source = DeadLetter.from_kafka("dlq", 0, 1, 0, None, b"{}", [("dlq-code", b"no_route")])
    assert decide(no_source, True, opts, INPUTS) == NO_SOURCE


def test_filter_fields() -> None:
    dl = dead()
    assert Filter().matches(dl)
    assert Filter(stages=frozenset({"route"}), event_types=frozenset({"order.created"})).matches(dl)
    assert not Filter(event_types=frozenset({"other"})).matches(dl)
    assert Filter(source_topics=frozenset({"orders"})).matches(dl)
    assert not Filter(source_topics=frozenset({"x"})).matches(dl)
    at = dl.failed_at_ms
    assert Filter(since_ms=at, until_ms=at + 1).matches(dl)
    assert not Filter(until_ms=at).matches(dl)
    assert not Filter(max_redrives=1).matches(dead(headers=(("dlq-redrive-count", b"1"),)))


def test_safe_text_truncates_and_escapes() -> None:
    assert safe_text(b"hello", 3) == ("hel", True)
    assert safe_text(None, 3) == ("(null)", False)
    text, cut = safe_text(b"a\x1b[31mred\xff\x00\n", 100)
    assert text == "a\\x1b[31mred\\xff\\x00\\x0a" and not cut
    assert safe_text("é".encode(), 100) == ("é", False)


def test_parse_when() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_when("6h", now) == int(datetime(2026, 11, 28, 6, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("2026-11-27") == int(datetime(2026, 11, 27, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("2026-11-27T08:00:00+01:00") == parse_when("2026-11-27T07:00:00Z")
    with pytest.raises(ValueError):
        parse_when("yesterday")


async def test_pacer_spaces_copies_evenly() -> None:
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = Pacer(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        await pacer.wait()
    assert slept == [0.25] * 4
    now[0] += 10  # idle: no burst credit piles up beyond the next slot
    await pacer.wait()
    await pacer.wait()
    assert slept[-1] == 0.25 and len(slept) == 5
