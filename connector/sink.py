"""The output side of Kafka: results, dead letters and dedup records, and the commit cycle.

One commit cycle makes a batch of finished events durable and then commits their offsets:

- ``exactly_once``: one Kafka transaction holds the cycle's result, dead-letter and dedup
  records and the consumer offsets (``send_offsets_to_transaction``). Readers with
  ``read_committed`` see all of it or none of it.
- ``at_least_once``: the records are sent with ``acks=all`` on an idempotent producer, every
  acknowledgement is awaited, then the offsets are committed through the consumer.

Either way an offset is committed only after the records that finish its event are safe.

The records go out in batches built here, one per partition (split where one is full):
``create_batch``/``send_batch`` cost a third of aiokafka's ``send`` per record (which makes
a future and a coroutine each and hashes the key in pure Python), and a cycle queues all
its records at once anyway. Keyed records get the partition Kafka's default partitioner
gives them (``connector.partitioning``).

No record can block a cycle (issue 9): every record is measured as Kafka counts it before
it is sent, and one over ``kafka.max_request_size`` is replaced by its bounded form
(``connector.bounds``). A record the producer would still refuse (over the producer's own
``max_request_size``, as aiokafka's ``send`` checks before queueing) or the broker refuses
(the error comes back on its batch's future: topic limits changed under us) is replaced by
its minimal form. The broker refuses a batch whole: a refused batch of several records is
sent again one record a batch, and only a record refused on its own is cut. In a
transaction a refused batch leaves a gap in the producer's sequence numbers, so the
transaction is aborted, the producer replaced, and the cycle tried again. The start-up check
(``topics``) makes sure every output topic accepts what the producer may send, so that path
stays the exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    IllegalOperation,
    InvalidMessageError,
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    TransactionalIdAuthorizationFailed,
)

from connector.bounds import bound, minimal_dead_letter, minimal_result, out_size
from connector.config import ConnectorSettings, DeliveryMode
from connector.errors import FencedError
from connector.events import OutRecord, TopicPartitionKey
from connector.fencing import fence_producer
from connector.metrics import Metrics
from connector.partitioning import partition_for
from connector.source import Source

log = logging.getLogger(__name__)
FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
Positions = dict[TopicPartitionKey, int]
# refusals of one record, not of the producer or the cluster
RECORD_ERRORS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
)


def transactional_id(settings: ConnectorSettings) -> str:
    """``<prefix>-<group>-<instance>``: unique per consumer group and replica. Without the
    group, two connectors of different groups on one host (one ``instance_id``, the host
    name) fenced each other at every start."""
    d = settings.delivery
    return f"{d.transactional_id_prefix}-{settings.kafka.group_id}-{d.instance_id}"


class CommitError(FencedError):
    """A commit cycle failed: the session restarts from the last committed offsets."""


Refusal = tuple[list[OutRecord], BaseException]  # a batch's records, refused together


class _Refused(Exception):
    """Batches the broker refused inside a transaction (which is then aborted)."""

    def __init__(self, refused: list[Refusal]) -> None:
        super().__init__(f"{sum(len(records) for records, _ in refused)} record(s) refused")
        self.refused = refused


@dataclass(eq=False)
class _Batch:
    """One produce batch in the making: aiokafka's ``BatchBuilder`` and what it holds."""

    topic: str
    partition: int
    builder: Any  # aiokafka.producer.message_accumulator.BatchBuilder (untyped)
    records: list[OutRecord] = field(default_factory=list)

    def add(self, record: OutRecord) -> bool:
        """False when the batch is full (its first record always goes in)."""
        added = self.builder.append(
            timestamp=None, key=record.key, value=record.value, headers=list(record.headers)
        )
        if added is None:
            return False
        self.records.append(record)
        return True


class Sink:
    """The producer, transactional or not, and the commit cycle."""

    def __init__(
        self,
        settings: ConnectorSettings,
        source: Source,
        kafka_kwargs: dict[str, object],
        transactional_suffix: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        d = settings.delivery
        self._metrics = metrics
        k = settings.kafka
        self.max_request_size = k.max_request_size
        self._producer_limit = k.max_request_size  # what aiokafka's ``send`` would accept
        self._oversize_value = k.oversize_value
        self._results_topic = k.results_topic
        self._dead_topic = k.dead_letter_topic
        self.bounded = 0  # outcome records replaced by a bounded form
        self.dropped = 0  # changelog records too large to write
        self._exactly_once = d.mode is DeliveryMode.EXACTLY_ONCE
        self._source = source
        self.transactional_id = (
            transactional_id(settings) + transactional_suffix if self._exactly_once else None
        )
        self._producer_kwargs: dict[str, object] = {
            **kafka_kwargs,
            "acks": "all",
            "enable_idempotence": True,
            "transactional_id": self.transactional_id,
            "transaction_timeout_ms": k.transaction_timeout_ms,
            # a cycle queues all its records before it waits, so batches fill without a
            # linger (5 ms on every cycle's latency), and one batch per partition holds a
            # whole cycle: aiokafka keeps one batch per partition and a full one waits for
            # the previous to be acknowledged (16 KiB: a round trip per 16 KiB per cycle)
            "linger_ms": 0,
            "retry_backoff_ms": k.producer_retry_backoff_ms,
            "max_batch_size": k.max_request_size,
            "max_request_size": k.max_request_size,
        }
        self._producer = self._new_producer()

    def _new_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(**self._producer_kwargs)
        if self._exactly_once:  # offsets committed as the consumer's group member (KIP-447)
            fence_producer(producer, self._source.member)
        return producer

    @property
    def mode(self) -> str:
        return "transaction" if self._exactly_once else "at_least_once"

    async def start(self) -> None:
        try:
            await self._producer.start()  # with a transactional id: fences older instances
        except FENCED as exc:
            raise FencedError(f"producer fenced at start: {exc}") from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def commit_cycle(
        self, records: Sequence[OutRecord], finish: Callable[[], Positions]
    ) -> Positions:
        """Publish ``records``, call ``finish`` (marks their events done, returns the
        positions to commit), and commit those positions, atomically when transactional
        (``finish`` is then called before the records are acknowledged: the transaction
        holds both or neither); else once every record is acknowledged. Records too large
        are replaced by their bounded forms first."""
        records = self.fit(records)
        if self.max_request_size > self._producer_limit:  # ``fit`` held none to the producer's
            records = [r for r in map(self._sendable, records) if r is not None]
        if self._exactly_once:
            return await self._transactional_cycle(records, finish)
        return await self._plain_cycle(records, finish)

    async def _transactional_cycle(
        self, records: Sequence[OutRecord], finish: Callable[[], Positions]
    ) -> Positions:
        """A record the broker refuses leaves a gap in the producer's sequence numbers for
        its partition (every later batch there fails): the transaction is aborted, the
        producer replaced (same transactional id), and the cycle tried again with the
        refused records in their minimal forms."""
        records = list(records)
        # the transaction makes the records and the positions durable together or not at
        # all, so the positions are known before the records are acknowledged (``finish``)
        positions = finish()
        alone: set[int] = set()  # ids of records to send in a batch of their own
        replaced: set[int] = set()  # ids of minimal forms
        while True:  # each try isolates or cuts a record, or fails (``_retry_plan``)
            try:
                await self._transaction(records, positions, alone)
                return positions
            except _Refused as exc:
                records, alone = self._retry_plan(records, exc.refused, alone, replaced)
                await self._renew_producer()

    async def _transaction(
        self, records: Sequence[OutRecord], positions: Positions, alone: Collection[int]
    ) -> None:
        producer = self._producer
        try:
            await producer.begin_transaction()
            try:
                # one step after the other: AddPartitions, the produce requests, AddOffsets
                # + TxnOffsetCommit, EndTxn. A produce request that reaches the broker while
                # AddOffsets is being written is refused (the broker cannot verify the
                # partition is in the transaction: NOT_ENOUGH_REPLICAS to a client without
                # transactions v2) and retried after ``producer_retry_backoff_ms``: side by
                # side, about one cycle in ten waited that backoff and logged seven warnings
                refused = await self._publish(records, alone)
                if refused:  # the whole transaction goes again
                    raise _Refused(refused)
                await self._send_offsets(producer, positions)
                await producer.commit_transaction()
            except FENCED:
                raise  # the broker aborted it already; the producer cannot abort any more
            except BaseException:
                if not _fatal(producer):
                    await _abort_quietly(producer)
                raise
        except FENCED as exc:
            raise FencedError(f"transactional producer fenced: {exc}") from exc
        except (KafkaError, IllegalOperation, AssertionError) as exc:
            if _fatal(producer):
                # fenced while a batch was in flight: aiokafka's sender moved the producer
                # to its fatal state and the next send says "not in transaction"
                raise FencedError(f"transactional producer in a fatal state: {exc!r}") from exc
            if isinstance(exc, KafkaError):
                raise CommitError(f"transaction failed and was aborted: {exc}") from exc
            raise

    async def _send_offsets(self, producer: AIOKafkaProducer, positions: Positions) -> None:
        if positions:
            await producer.send_offsets_to_transaction(
                {TopicPartition(t, p): pos for (t, p), pos in positions.items()},
                self._source.group_id,
            )

    async def _plain_cycle(
        self, records: Sequence[OutRecord], finish: Callable[[], Positions]
    ) -> Positions:
        try:
            await self._publish_all(records)
        except KafkaError as exc:
            raise CommitError(f"publishing failed: {exc}") from exc
        positions = finish()
        if positions:
            await self._source.commit(positions)
        return positions

    def fit(self, records: Sequence[OutRecord]) -> list[OutRecord]:
        """Each record, or its bounded form when it is over ``max_request_size``; a
        changelog record that cannot fit is left out (its event's dedup entry then lives
        only in this process's window)."""
        out: list[OutRecord] = []
        for record in records:
            fitted = bound(
                record,
                self.max_request_size,
                self._oversize_value,
                results_topic=self._results_topic,
                dead_topic=self._dead_topic,
            )
            if fitted is record:
                out.append(record)
                continue
            if fitted is None:
                self._count(record, "left_out")
                log.warning(
                    "a %d-byte record for %s is over kafka.max_request_size (%d): left out",
                    out_size(record),
                    record.topic,
                    self.max_request_size,
                )
                continue
            self._count(record, "bounded")
            log.warning(
                "a %d-byte record for %s is over kafka.max_request_size (%d): written in "
                "bounded form (%d bytes)",
                out_size(record),
                record.topic,
                self.max_request_size,
                out_size(fitted),
            )
            out.append(fitted)
        return out

    def _sendable(self, record: OutRecord) -> OutRecord | None:
        """The record, or its minimal form (None: left out) when it is over the
        producer's ``max_request_size``: aiokafka's ``send`` refuses such a record before
        queueing it, and batches built here are held to the same limit."""
        size = out_size(record)
        if size <= self._producer_limit:
            return record
        exc = MessageSizeTooLargeError(
            f"The message is {size} bytes when serialized which is larger than the "
            "maximum request size you have configured with the max_request_size "
            "configuration"
        )
        replacement = self._minimal(record, str(exc))
        log.warning(
            "the producer refused a record for %s (%s): %s",
            record.topic,
            exc,
            "writing its minimal form" if replacement else "left out",
        )
        self._count(record, "left_out" if replacement is None else "bounded")
        return replacement

    async def _batches(self, records: Sequence[OutRecord], alone: Collection[int]) -> list[_Batch]:
        """The records in produce batches, one per partition in the order given, split
        where a batch is full; a record whose id is in ``alone`` gets a batch of its own
        (the records after it on its partition go in a later batch: the order holds)."""
        producer = self._producer
        partitions: dict[str, list[int]] = {}
        available: dict[str, list[int]] = {}  # with a leader: where keyless records go
        current: dict[tuple[str, int], _Batch] = {}
        batches: list[_Batch] = []
        for record in records:
            partition = record.partition
            if partition is None:
                known = partitions.get(record.topic)
                if known is None:
                    known = partitions[record.topic] = sorted(
                        await producer.partitions_for(record.topic)
                    )
                    led = producer.client.cluster.available_partitions_for_topic(record.topic)
                    available[record.topic] = sorted(led or ()) or known
                partition = partition_for(record.key, known, available[record.topic])
            where = (record.topic, partition)
            batch = current.get(where)
            single = id(record) in alone
            if single or batch is None or not batch.add(record):
                batch = _Batch(record.topic, partition, producer.create_batch())
                batch.add(record)
                batches.append(batch)
                if single:
                    current.pop(where, None)
                else:
                    current[where] = batch
        return batches

    async def _publish_in_order(
        self, records: Sequence[OutRecord], alone: Collection[int] = ()
    ) -> tuple[list[Refusal], list[OutRecord]]:
        """Without a transaction: each partition's batches one after another, the next
        only once the last is acknowledged (partitions side by side), and none after a
        refusal. A batch queued behind a refused one is not reliably refused too (a
        producer id the partition has not seen yet is accepted at any sequence number), and
        written it would put its records before the refused ones (the review's finding).
        Returns the refused batches and the records not sent."""
        producer = self._producer
        lanes: dict[tuple[str, int], list[_Batch]] = {}
        for batch in await self._batches(records, alone):
            lanes.setdefault((batch.topic, batch.partition), []).append(batch)

        async def lane(batches: list[_Batch]) -> tuple[list[Refusal], list[OutRecord]]:
            for n, batch in enumerate(batches):
                future = await producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                try:
                    await future
                except RECORD_ERRORS as exc:
                    rest = [r for later in batches[n + 1 :] for r in later.records]
                    return [(batch.records, exc)], rest
            return [], []

        refused: list[Refusal] = []
        unsent: list[OutRecord] = []
        for lane_refused, lane_unsent in await asyncio.gather(*map(lane, lanes.values())):
            refused += lane_refused
            unsent += lane_unsent
        return refused, unsent

    async def _publish(
        self, records: Sequence[OutRecord], alone: Collection[int] = ()
    ) -> list[Refusal]:
        """In a transaction: send every record and wait for every acknowledgement; return
        the batches the broker refused. A later batch on a refused one's partition fails
        ``OutOfOrderSequenceNumber`` (the refusal left a gap in the producer's sequence
        numbers): not an error of its own, as the whole transaction goes again. Any other
        error propagates. Unawaited, a refused batch's future failed silently and the
        transaction committed without its records."""
        producer = self._producer
        sent: list[tuple[_Batch, asyncio.Future[object]]] = []
        try:
            for batch in await self._batches(records, alone):
                future = await producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                sent.append((batch, future))
        except BaseException:
            for _, future in sent:  # their failures are this one's; retrieved, not logged
                future.add_done_callback(_retrieve)
            raise
        answers = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        refused: list[Refusal] = []
        gaps: set[tuple[str, int]] = set()
        for (batch, _), answer in zip(sent, answers, strict=True):
            if isinstance(answer, RECORD_ERRORS):
                refused.append((batch.records, answer))
                gaps.add((batch.topic, batch.partition))
            elif isinstance(answer, OutOfOrderSequenceNumber) and (
                (batch.topic, batch.partition) in gaps
            ):
                continue
            elif isinstance(answer, BaseException):
                raise answer
        return refused

    def _retry_plan(
        self,
        records: list[OutRecord],
        refused: list[Refusal],
        alone: set[int],
        replaced: set[int],
    ) -> tuple[list[OutRecord], set[int]]:
        """The records for the next try, and the ids of those to send alone. The broker
        refuses a batch whole for the one record it cannot take: a refused batch of several
        records goes again one record a batch; a record refused alone is replaced by its
        minimal form (its id joins ``replaced``); a minimal form refused alone ends the
        cycle. So every try isolates or cuts at least one record: the tries end."""
        alone = set(alone)
        reasons: dict[int, BaseException] = {}
        for batch_records, exc in refused:
            if len(batch_records) > 1:
                alone.update(id(record) for record in batch_records)
            elif id(batch_records[0]) in replaced:
                raise CommitError(
                    f"a record for {batch_records[0].topic} refused even in its minimal "
                    f"form: {type(exc).__name__}: {exc}"
                )
            else:
                reasons[id(batch_records[0])] = exc
        out = []
        for record in records:
            reason = reasons.get(id(record))
            if reason is None:
                out.append(record)
                continue
            replacement = self._minimal(record, f"{type(reason).__name__}: {reason}")
            log.warning(
                "the broker refused a record for %s (%s): %s",
                record.topic,
                reason,
                "writing its minimal form" if replacement else "left out",
            )
            if replacement is None:
                self._count(record, "left_out")
            else:
                self._count(record, "bounded")
                out.append(replacement)
                alone.add(id(replacement))
                replaced.add(id(replacement))
        return out, alone

    async def _renew_producer(self) -> None:
        await self._producer.stop()
        self._producer = self._new_producer()
        await self.start()

    async def _publish_all(self, records: Sequence[OutRecord]) -> None:
        """Without a transaction: what a refusal kept from being written (the refused
        batches, and the batches not sent after them on their partitions) goes again on a
        new producer, isolated or cut as ``_retry_plan`` says, until all of it is written."""
        pending = list(records)
        alone: set[int] = set()
        replaced: set[int] = set()
        while True:
            refused, unsent = await self._publish_in_order(pending, alone)
            if not refused:
                return
            # the refusal left a gap in the idempotent producer's sequence numbers for its
            # partition: a new producer
            await self._renew_producer()
            again = {id(r) for batch, _ in refused for r in batch} | {id(r) for r in unsent}
            pending = [record for record in pending if id(record) in again]
            pending, alone = self._retry_plan(pending, refused, alone, replaced)

    def _count(self, record: OutRecord, form: str) -> None:
        """An outcome record that could not be written as it was: ``bounded`` (cut or
        minimal form) or ``left_out`` (a changelog record that cannot be cut)."""
        if form == "bounded":
            self.bounded += 1
        else:
            self.dropped += 1
        if self._metrics is not None:
            if record.topic == self._results_topic:
                kind = "result"
            elif record.topic == self._dead_topic:
                kind = "dead_letter"
            else:
                kind = "changelog"
            self._metrics.outcomes_bounded.labels(kind, form).inc()

    def _minimal(self, record: OutRecord, reason: str) -> OutRecord | None:
        if record.topic == self._dead_topic:
            return minimal_dead_letter(record, reason)
        if record.topic == self._results_topic:
            try:
                body = orjson.loads(record.value or b"{}")
            except orjson.JSONDecodeError:
                body = {}
            return minimal_result(record, body if isinstance(body, dict) else {})
        return None


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def _fatal(producer: AIOKafkaProducer) -> bool:
    """Whether the producer's transaction manager is in its fatal state (aiokafka has no
    public accessor): such a producer can neither send, abort nor begin again."""
    manager = getattr(producer, "_txn_manager", None)
    if manager is None or not manager.is_fatal_error():
        return False
    waiter = manager.wait_for_transaction_end()  # holds the fence: retrieved, not logged at GC
    if waiter.done():
        _retrieve(waiter)
    return True


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.abort_transaction()
    except (KafkaError, AssertionError):  # aiokafka asserts on a producer in a fatal state
        log.warning("abort_transaction failed; the broker will time the transaction out")
