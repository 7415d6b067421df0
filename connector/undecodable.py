"""The way past a record the Kafka client cannot decode (used by ``connector.source``).

aiokafka raises from ``getmany`` when a fetched record cannot be decoded (a header name that
is not UTF-8, a batch whose CRC does not match, a codec it does not know), every time it
reaches it: the partition can never be read past it. Worse, the records of other partitions
drained earlier in the same call are lost to the caller while their positions have moved.

``FetchGuard`` keeps the connector's own next offset per partition (the offset after the
last record handed out) and, on such an error:

1. seeks every fetchable partition back to it, so nothing drained in the failed call is lost;
2. reads each partition on its own: the one that raises is the culprit;
3. takes the culprit's records aiokafka can decode one per call, up to the failing batch;
4. fetches that batch's bytes itself and reads them record by record
   (``connector.rawrecords``): its good records are handed out as usual, the undecodable
   ones as records marked ``undecodable`` (the pipeline dead-letters them by their
   coordinates, code ``undecodable_record``), with the whole batches after it in those
   bytes as far as the fetch's room goes (a producer that writes bad records writes many:
   one look for all of them, not one per batch); the partition goes on after the last.

aiokafka decodes a whole batch on each attempt, so a batch with one bad record can only be
read past, not into: that is why the rest of it is handed out from our own reading.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import Iterable
from typing import Any

import cramjam
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnsupportedCodecError,
    for_code,
)
from aiokafka.protocol.fetch import FetchRequest

from connector.events import InputRecord
from connector.rawrecords import BadBatch, RawRecord, find_bad_batch

log = logging.getLogger(__name__)
# what aiokafka's record parsers raise for a record they cannot decode
UNDECODABLE: tuple[type[BaseException], ...] = (
    UnicodeDecodeError,
    CorruptRecordException,
    UnsupportedCodecError,
    struct.error,
    zlib.error,
    cramjam.DecompressionError,
)
READ_COMMITTED = 1
RAW_FETCH_MAX_BYTES = 1_048_576  # the broker sends the first batch whole even if larger
# the partitions' fetches after the seek back: waited for this long in all (those not in by
# then are read by the next fetch), and this long for each of the culprit's own records
WAIT_S = 2.0
NOT_FOUND_LIMIT = 3  # the error again and again where our reading finds nothing: give up


def input_record(m: Any) -> InputRecord:
    """An aiokafka ``ConsumerRecord`` as the pipeline's record."""
    return InputRecord(
        topic=m.topic,
        partition=m.partition,
        offset=m.offset,
        key=m.key,
        value=m.value,
        headers=tuple((h[0], bytes(h[1] or b"")) for h in (m.headers or ())),
        timestamp_ms=m.timestamp,
    )


def raw_input_record(tp: TopicPartition, raw: RawRecord) -> InputRecord:
    """A record read from its bytes; header names that are not UTF-8 keep their bytes as
    backslash escapes (the dead letter's headers must be text)."""
    return InputRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=raw.offset,
        key=raw.key,
        value=raw.value,
        headers=tuple((n.decode("utf-8", "backslashreplace"), v or b"") for n, v in raw.headers),
        timestamp_ms=raw.timestamp_ms,
        undecodable=raw.problem,
    )


class _Rebalanced(Exception):
    """A rebalance began during the recovery: what it read belongs to the old assignment."""


class FetchGuard:
    """The connector's own next offset per partition, and the recovery described above."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._next: dict[TopicPartition, int] = {}
        self._not_found: dict[TopicPartition, int] = {}
        self._epoch = 0  # counts revocations and assignments (``forget``)
        self._first: TopicPartition | None = None  # where the next recovery starts
        # while recovering, the consumer's positions are not the connector's (records
        # drained in the failed call are not handed out yet): nobody may act on them
        self.busy = False

    def note(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Records handed out: each partition's next offset is after its last one."""
        for tp, msgs in batches.items():
            if msgs:
                self._next[tp] = msgs[-1].offset + 1

    @property
    def epoch(self) -> int:
        """Moves at each revocation and assignment: work that awaited across a change of
        it holds positions of an assignment that is gone."""
        return self._epoch

    def moved(self, tp: TopicPartition, offset: int) -> None:
        """The connector moved the position itself (a reset, a seek)."""
        self._next[tp] = offset

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Revoked or newly assigned: the position comes from the committed offset."""
        self._epoch += 1
        for tp in tps:
            self._next.pop(tp, None)
            self._not_found.pop(tp, None)

    async def recover(self, error: BaseException, limit: int) -> list[InputRecord]:
        """After ``getmany`` raised ``error`` (one of UNDECODABLE): at most about ``limit``
        records, the undecodable ones among them marked."""
        self.busy = True
        epoch = self._epoch
        try:
            return await self._recover(error, limit)
        except (_Rebalanced, AssertionError, IllegalStateError):
            if self._epoch == epoch:
                raise  # not a rebalance's doing
            # records read so far are of the old assignment, none handed out: each
            # partition's owner fetches them again from the committed offset
            log.info("a rebalance during the recovery; its partitions are read again")
            return []
        finally:
            self.busy = False

    def _same_assignment(self, epoch: int) -> None:
        if self._epoch != epoch:
            raise _Rebalanced

    async def _recover(self, error: BaseException, limit: int) -> list[InputRecord]:
        consumer = self._consumer
        epoch = self._epoch
        paused = consumer.paused()
        fetchable = sorted(
            (tp for tp in consumer.assignment() if tp not in paused),
            key=lambda tp: (tp.topic, tp.partition),
        )
        # from where the last recovery ran out of room: with a small room (a buffer nearly
        # full) and a backlog on the first partitions, starting from the first each time
        # never reached a culprit further on, and every fetch was a recovery until the
        # backlog was gone
        first = self._first
        if first in fetchable:
            at = fetchable.index(first)
            fetchable = fetchable[at:] + fetchable[:at]
        self._first = None
        log.info(
            "a fetched record cannot be decoded (%s: %s); reading the %d partitions one by one",
            type(error).__name__, error, len(fetchable),
        )  # fmt: skip
        for tp in fetchable:
            self._same_assignment(epoch)
            await self._rewind(tp)
        out: list[InputRecord] = []
        deadline = time.monotonic() + WAIT_S
        for tp in fetchable:
            room = limit - len(out)
            if room <= 0:
                self._first = tp  # a culprit not reached yet raises again: start here
                break
            self._same_assignment(epoch)
            try:
                out += await self._get(tp, room, deadline - time.monotonic())
            except UNDECODABLE:
                out += await self._isolate(tp, room, epoch)
            except (NoOffsetForPartitionError, OffsetOutOfRangeError):
                continue  # raised again by the next fetch, where ``connector.resets`` acts
        self._same_assignment(epoch)
        return out

    async def _rewind(self, tp: TopicPartition) -> None:
        """Back to the offset after the last record handed out, else the committed one
        (every other position is set by ``connector.resets``, which says ``moved``)."""
        consumer = self._consumer
        target = self._next.get(tp)
        if target is None:
            target = await consumer.committed(tp)
        if target is not None:
            consumer.seek(tp, target)

    async def _get(self, tp: TopicPartition, max_records: int, wait_s: float) -> list[InputRecord]:
        """``tp``'s fetched records (waiting for its fetch after the seek), unless its
        position is known to be at the end of what can be read."""
        consumer = self._consumer
        lso = consumer.last_stable_offset(tp)
        if lso is not None and await consumer.position(tp) >= lso:
            return []
        timeout_ms = max(0, int(wait_s * 1000))
        batches = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=max_records)
        self.note(batches)
        return [input_record(m) for msgs in batches.values() for m in msgs]

    async def _isolate(self, tp: TopicPartition, room: int, epoch: int) -> list[InputRecord]:
        out: list[InputRecord] = []
        while len(out) < room:  # aiokafka's own records before the batch it fails on
            self._same_assignment(epoch)
            try:
                got = await self._get(tp, 1, WAIT_S)
            except UNDECODABLE:
                break
            if not got:
                return out  # nothing came in time: the next fetch raises again
            out += got
        else:
            return out
        self._same_assignment(epoch)
        position = await self._consumer.position(tp)
        bad = await self._bad_batch(tp, position, room - len(out))
        self._same_assignment(epoch)
        if bad is None:
            count = self._not_found[tp] = self._not_found.get(tp, 0) + 1
            if count >= NOT_FOUND_LIMIT:
                raise RuntimeError(
                    f"{tp.topic}/{tp.partition} at offset {position}: the Kafka client "
                    f"cannot decode a record there and none was found in the fetched bytes"
                )
            return out
        self._not_found.pop(tp, None)
        records = bad.records[: room - len(out)]
        after = bad.next_offset if len(records) == len(bad.records) else records[-1].offset + 1
        self._consumer.seek(tp, after)
        self._next[tp] = after
        bad_ones = [r for r in records if r.problem is not None]
        log.warning(
            "%s/%d: %d record(s) the Kafka client cannot decode at offsets %s%s, "
            "dead-lettered; the partition goes on at offset %d",
            tp.topic, tp.partition, len(bad_ones),
            ", ".join(str(r.offset) for r in bad_ones[:10]),
            " …" if len(bad_ones) > 10 else "", after,
        )  # fmt: skip
        return out + [raw_input_record(tp, r) for r in records]

    async def _bad_batch(self, tp: TopicPartition, offset: int, more: int) -> BadBatch | None:
        """Fetch ``tp`` from ``offset`` ourselves and read the bytes (read_committed): the
        first bad batch, and up to ``more`` records of the whole batches after it."""
        client = self._consumer._client
        node = client.cluster.leader_for_partition(tp)
        if node is None or node < 0:
            await client.force_metadata_update()
            node = client.cluster.leader_for_partition(tp)
            if node is None or node < 0:
                return None
        request = FetchRequest(
            0,
            1,
            RAW_FETCH_MAX_BYTES,
            READ_COMMITTED,
            [(tp.topic, [(tp.partition, offset, RAW_FETCH_MAX_BYTES)])],
        )
        response = await client.send(node, request)
        for _topic, partitions in response.topics:
            for _partition, error_code, _high, *data in partitions:
                if error_code != 0:
                    raise for_code(error_code)(f"raw fetch of {tp.topic}/{tp.partition}")
                aborted = data[2] if response.API_VERSION >= 11 else data[-2]
                return find_bad_batch(data[-1] or b"", offset, aborted or (), more)
        return None
