"""connector.rawrecords: the same verdict as aiokafka's parser, record by record."""

from __future__ import annotations

import gzip
import struct

import pytest
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from connector.rawrecords import ATTRIBUTES_AT, find_bad_batch
from tests.raw_batches import CRC_OFFSET, Raw, batch

BAD = b"\xff\xfe-not-a-utf8-name"


def aiokafka_fails(data: bytes) -> bool:
    records = MemoryRecords(data)
    try:
        while records.has_next():
            next_batch = records.next_batch()
            if not next_batch.validate_crc():
                return True
            for _ in next_batch:
                pass
    except Exception:
        return True
    return False


def rec(name: str, headers: list[tuple[bytes, bytes]] | None = None) -> Raw:
    return (name.encode(), b"value-" + name.encode(), headers or [])


def test_good_batches_are_not_flagged() -> None:
    data = batch([rec("a"), rec("b", [(b"h", b"1")])]) + batch([rec("c")], base_offset=2)
    assert not aiokafka_fails(data)
    assert find_bad_batch(data, 0) is None


def test_a_bad_header_name_is_named_and_its_neighbours_kept() -> None:
    data = batch([rec("a"), rec("bad", [(b"ok", b"1"), (BAD, b"v")]), rec("c")])
    assert aiokafka_fails(data)
    found = find_bad_batch(data, 0)
    assert found is not None
    assert found.next_offset == 3
    assert [(r.offset, r.key, r.problem is None) for r in found.records] == [
        (0, b"a", True),
        (1, b"bad", False),
        (2, b"c", True),
    ]
    bad = found.records[1]
    assert bad.value == b"value-bad"
    assert bad.headers == ((b"ok", b"1"), (BAD, b"v"))
    assert "not UTF-8" in (bad.problem or "")


def test_records_before_the_offset_asked_for_are_left_out() -> None:
    data = batch([rec("a"), rec("bad", [(BAD, b"v")]), rec("c")], base_offset=10)
    found = find_bad_batch(data, 12)
    assert found is not None
    assert [r.offset for r in found.records] == [12]
    assert found.next_offset == 13


def test_a_good_batch_before_the_bad_one_is_passed() -> None:
    data = batch([rec("a")], base_offset=4) + batch([rec("bad", [(BAD, b"")])], base_offset=5)
    found = find_bad_batch(data, 4)
    assert found is not None
    assert [r.offset for r in found.records] == [5]


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"bad_crc": True}, "CRC mismatch"), ({"codec": 6}, "unknown compression codec 6")],
)
def test_a_batch_that_cannot_be_read_is_one_record_at_its_last_offset(
    kwargs: dict[str, object], why: str
) -> None:
    data = batch([rec("a"), rec("b"), rec("c")], base_offset=20, **kwargs)  # type: ignore[arg-type]
    assert aiokafka_fails(data)
    found = find_bad_batch(data, 21)
    assert found is not None
    (only,) = found.records
    assert (only.offset, only.first_offset, only.key, only.value) == (22, 21, None, None)
    assert why in (only.problem or "") and "20-22" in (only.problem or "")
    assert found.next_offset == 23


def test_a_gzip_batch_that_does_not_decompress() -> None:
    data = bytearray(batch([rec("a")], codec=1))  # codec says gzip, records are not
    assert aiokafka_fails(bytes(data))
    found = find_bad_batch(bytes(data), 0)
    assert found is not None and "cannot decompress" in (found.records[0].problem or "")


def gzipped(plain: bytes) -> bytes:
    """The batch with its records compressed with gzip (header, length and CRC updated)."""
    data = bytearray(plain[:61] + gzip.compress(plain[61:]))
    struct.pack_into(">i", data, 8, len(data) - 12)
    (attributes,) = struct.unpack_from(">h", data, ATTRIBUTES_AT)
    struct.pack_into(">h", data, ATTRIBUTES_AT, attributes | 1)
    struct.pack_into(">I", data, CRC_OFFSET, calc_crc32c(bytes(data[ATTRIBUTES_AT:])))
    return bytes(data)


def test_a_gzip_batch_is_read() -> None:
    data = gzipped(batch([rec("a"), rec("b")]))
    assert not aiokafka_fails(data)
    assert find_bad_batch(data, 0) is None


def test_a_bad_header_name_in_a_gzip_batch_costs_only_its_record() -> None:
    data = gzipped(batch([rec("a"), rec("bad", [(BAD, b"v")]), rec("c")]))
    assert aiokafka_fails(data)
    found = find_bad_batch(data, 0)
    assert found is not None
    assert [(r.key, r.problem is None) for r in found.records] == [
        (b"a", True),
        (b"bad", False),
        (b"c", True),
    ]


def test_a_broken_record_structure_covers_the_rest_of_its_batch() -> None:
    data = bytearray(batch([rec("a"), rec("b"), rec("c")], base_offset=30))
    # the second record's length varint: make it claim one more byte than it has
    first_len = data[61] // 2  # zigzag varint of a small length, one byte
    second = 61 + 1 + first_len
    data[second] += 2
    struct.pack_into(">I", data, CRC_OFFSET, calc_crc32c(bytes(data[ATTRIBUTES_AT:])))
    assert aiokafka_fails(bytes(data))
    found = find_bad_batch(bytes(data), 30)
    assert found is not None
    good, broken = found.records
    assert (good.offset, good.problem) == (30, None)
    assert (broken.offset, broken.first_offset) == (32, 31)
    assert "31-32" in (broken.problem or "")


def test_an_aborted_transaction_is_skipped_as_read_committed_does() -> None:
    aborted = batch([rec("x", [(BAD, b"")])], base_offset=0, producer_id=7)
    after = batch([rec("y", [(BAD, b"")])], base_offset=1)
    found = find_bad_batch(aborted + after, 0, [(7, 0)])
    assert found is not None
    assert [r.offset for r in found.records] == [1]  # not the aborted record at 0
    assert find_bad_batch(aborted, 0, []) is not None  # not aborted: it is read


def test_a_partial_batch_at_the_end_is_left_for_the_next_fetch() -> None:
    data = batch([rec("a")]) + batch([rec("bad", [(BAD, b"")])], base_offset=1)[:-5]
    assert find_bad_batch(data, 0) is None


def aiokafka_records(data: bytes) -> list[tuple[int, int, bytes | None, bytes | None, tuple]]:
    out = []
    records = MemoryRecords(data)
    while records.has_next():
        for r in records.next_batch():
            out.append((r.offset, r.timestamp, r.key, r.value, tuple(r.headers)))
    return out


def test_more_reads_the_whole_batches_after_the_bad_one_as_aiokafka_would() -> None:
    """A producer that writes many bad records: the batches after the first bad one are
    read in the same look (good ones as aiokafka reads them), whole batches only, up to
    ``more`` records; aborted transactions are skipped there too."""
    good_plain = batch([rec("g1", [(b"h", b"1")]), rec("g2")], base_offset=2)
    good_gzip = gzipped(batch([rec("g3"), rec("g4")], base_offset=5))
    data = (
        batch([rec("bad-0", [(BAD, b"")])], base_offset=0)
        + batch([rec("bad-1", [(BAD, b"")])], base_offset=1)
        + good_plain
        + batch([rec("aborted", [(BAD, b"")])], base_offset=4, producer_id=9)
        + good_gzip
        + batch([rec("bad-7", [(BAD, b"")])], base_offset=7)
    )
    found = find_bad_batch(data, 0, [(9, 4)], more=100)
    assert found is not None
    assert found.next_offset == 8
    assert [(r.offset, r.problem is None) for r in found.records] == [
        (0, False), (1, False), (2, True), (3, True), (5, True), (6, True), (7, False),
    ]  # fmt: skip
    by_offset = {r.offset: r for r in found.records}
    for offset, timestamp, key, value, headers in aiokafka_records(good_plain + good_gzip):
        mine = by_offset[offset]
        assert (mine.timestamp_ms, mine.key, mine.value) == (timestamp, key, value)
        assert tuple((n.decode(), v) for n, v in mine.headers) == headers
    # whole batches only, up to ``more`` records: the first bad batch and the next one
    found = find_bad_batch(data, 0, [(9, 4)], more=2)
    assert found is not None
    assert ([r.offset for r in found.records], found.next_offset) == ([0, 1], 2)
    assert find_bad_batch(data, 0, [(9, 4)]).next_offset == 1  # type: ignore[union-attr]
