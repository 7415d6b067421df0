"""Kafka record batches (format v2) read from their bytes, one record at a time (pure).

aiokafka decodes each record's header names as UTF-8 and stops at the first record it cannot
read, or at a batch whose CRC does not match or whose codec it does not know: it raises, and
the partition can never be read past it. ``find_bad_batch`` makes the same checks on the
bytes of a fetch, in the same order and skipping the same batches (control batches, aborted
transactions under ``read_committed``), and returns the first batch that fails with every
record of it: those aiokafka can decode, those it cannot (and why), with the bytes that
could still be read (``connector.undecodable`` hands them out in its place), and on request
the whole batches after it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.record.util import calc_crc32c, decode_varint

HEADER = struct.Struct(">qiibIhiqqqhii")  # the v2 batch header, 61 bytes
ATTRIBUTES_AT = struct.calcsize(">qiibI")  # the CRC covers the batch from here
LOG_OVERHEAD = 12  # base offset + length
CODEC_MASK, TIMESTAMP_LOG_APPEND, TRANSACTIONAL, CONTROL = 0x07, 0x08, 0x10, 0x20
CODECS: dict[int, Callable[[bytes], bytes]] = {
    1: lambda data: bytes(gzip_decode(data)),
    2: lambda data: bytes(snappy_decode(data)),
    3: lambda data: bytes(lz4_decode(data)),
    4: lambda data: bytes(zstd_decode(data)),
}
RawHeaders = tuple[tuple[bytes, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record of a batch as far as its bytes can be read."""

    offset: int
    timestamp_ms: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: RawHeaders = ()  # names as bytes: one may not be UTF-8
    problem: str | None = None  # why aiokafka cannot decode it; None: it can
    first_offset: int | None = None  # set when the record stands for a range it cannot split


@dataclass(frozen=True, slots=True)
class BadBatch:
    """The first batch aiokafka cannot decode: its records from the offset asked for on,
    and the offset after the batch (where reading goes on)."""

    records: tuple[RawRecord, ...]
    next_offset: int


class _Unreadable(Exception):
    """A record's structure is broken: nothing after it in the batch can be found."""


def find_bad_batch(
    data: bytes, from_offset: int, aborted: Iterable[tuple[int, int]] = (), more: int = 0
) -> BadBatch | None:
    """The first batch in a fetch response's records (``data``, read from ``from_offset``)
    that aiokafka would fail on, or None. ``aborted``: the response's aborted transactions
    (producer id, first offset); their batches are skipped, as ``read_committed`` does.
    ``more``: up to that many records of the whole batches after it are read too (good or
    not), so that a producer writing many undecodable records costs one look each ``more``
    records rather than one per batch."""
    pending = sorted(aborted, key=lambda entry: entry[1])
    aborted_ids: set[int] = set()
    found: list[RawRecord] | None = None
    next_offset = from_offset
    pos = 0
    while pos + LOG_OVERHEAD + 5 <= len(data):
        (length,) = struct.unpack_from(">i", data, pos + 8)
        end = pos + LOG_OVERHEAD + length
        if end > len(data) or length < HEADER.size - LOG_OVERHEAD:
            break  # a partial batch at the end of the response: the next fetch has it
        if data[pos + 16] != 2:
            if found is not None:
                break  # the old message formats: not ours to judge (Kafka 4 has none)
            pos = end
            continue
        batch = memoryview(data)[pos:end]
        pos = end
        read = _check_batch(batch, from_offset, pending, aborted_ids)
        if found is None:
            if read.bad:
                found, next_offset = list(read.records), read.next_offset
            continue
        if len(found) + len(read.records) > more:
            break
        found += read.records
        next_offset = read.next_offset
    return None if found is None else BadBatch(tuple(found), next_offset)


@dataclass(frozen=True, slots=True)
class _Batch:
    records: tuple[RawRecord, ...]  # from the offset asked for on
    next_offset: int
    bad: bool  # aiokafka fails on it


def _check_batch(
    batch: memoryview, from_offset: int, pending: list[tuple[int, int]], aborted_ids: set[int]
) -> _Batch:
    header = HEADER.unpack_from(batch)
    base, crc, attributes, last_delta, first_ts, max_ts, producer_id = (
        header[0], header[4], header[5], header[6], header[7], header[8], header[9]
    )  # fmt: skip
    last = base + last_delta
    skipped = _Batch((), last + 1, False)

    def whole(problem: str) -> _Batch:
        # one record for the batch, at its last offset: a replay from anywhere before the
        # batch's end finds the same coordinates (and its dead-letter mark)
        first = max(base, from_offset)
        record = RawRecord(last, max_ts, problem=problem, first_offset=first)
        return _Batch((record,), last + 1, True)

    if calc_crc32c(bytes(batch[ATTRIBUTES_AT:])) != crc:
        return whole(f"batch of offsets {base}-{last}: CRC mismatch (corrupt)")
    while pending and pending[0][1] <= base:
        aborted_ids.add(pending.pop(0)[0])
    control = bool(attributes & CONTROL)
    payload = bytes(batch[HEADER.size :])
    if control:
        if _is_abort_marker(payload):
            aborted_ids.discard(producer_id)
        return skipped
    if attributes & TRANSACTIONAL and producer_id in aborted_ids:
        return skipped
    if last < from_offset:
        return skipped  # read already (the broker starts with the batch holding from_offset)
    codec = attributes & CODEC_MASK
    if codec:
        decode = CODECS.get(codec)
        if decode is None:
            return whole(f"batch of offsets {base}-{last}: unknown compression codec {codec}")
        try:
            payload = decode(payload)
        except Exception as exc:  # noqa: BLE001 (any codec's failure: the batch is unreadable)
            return whole(f"batch of offsets {base}-{last}: cannot decompress: {exc!r}")
    ts = max_ts if attributes & TIMESTAMP_LOG_APPEND else None
    records: list[RawRecord] = []
    at = 0
    bad = False
    for _ in range(header[12]):
        try:
            record, at = _read_record(payload, at, base, first_ts, ts)
        except _Unreadable as exc:
            first = max(from_offset, base if not records else records[-1].offset + 1)
            problem = f"offsets {first}-{last} of the batch cannot be read: {exc}"
            records.append(RawRecord(last, max_ts, problem=problem, first_offset=first))
            bad = True
            break
        records.append(record)
        bad = bad or record.problem is not None
    wanted = tuple(r for r in records if r.offset >= from_offset)
    return _Batch(wanted, last + 1, bad)


def _is_abort_marker(payload: bytes) -> bool:
    try:
        record, _ = _read_record(payload, 0, 0, 0, None)
    except _Unreadable:
        return False
    key = record.key or b""
    return len(key) >= 4 and struct.unpack_from(">hh", key)[1] == 0


def _read_record(
    buf: bytes, pos: int, base: int, first_ts: int, log_append_ts: int | None
) -> tuple[RawRecord, int]:
    """One record at ``pos``, checked as aiokafka checks it; the position after it."""
    try:
        length, pos = decode_varint(buf, pos)
        start = pos
        _attributes, pos = decode_varint(buf, pos)
        ts_delta, pos = decode_varint(buf, pos)
        offset_delta, pos = decode_varint(buf, pos)
        key, pos = _bytes(buf, pos)
        value, pos = _bytes(buf, pos)
        count, pos = decode_varint(buf, pos)
        if count < 0:
            raise _Unreadable(f"invalid number of record headers {count}")
        headers: list[tuple[bytes, bytes | None]] = []
        problem = None
        for _ in range(count):
            name, pos = _bytes(buf, pos)
            if name is None:
                raise _Unreadable("negative header name size")
            try:
                name.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = problem or f"header name {name[:64]!r} is not UTF-8 ({exc.reason})"
            header_value, pos = _bytes(buf, pos)
            headers.append((name, header_value))
    except (ValueError, IndexError, struct.error) as exc:
        raise _Unreadable(f"invalid record structure: {exc!r}") from exc
    if pos - start != length or pos > len(buf):
        raise _Unreadable(f"record size {length} does not match its fields ({pos - start})")
    timestamp = log_append_ts if log_append_ts is not None else first_ts + ts_delta
    record = RawRecord(base + offset_delta, timestamp, key, value, tuple(headers), problem)
    return record, pos


def _bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buf, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buf):
        raise _Unreadable(f"a field of {size} bytes runs past the batch")
    return bytes(buf[pos : pos + size]), pos + size
