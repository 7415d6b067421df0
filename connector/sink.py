"""The output side of Kafka: results, dead letters and dedup records, and the commit cycle.

One commit cycle makes a batch of finished events durable and then commits their offsets:

- ``exactly_once``: one Kafka transaction holds the cycle's result, dead-letter and dedup
  records and the consumer offsets (``send_offsets_to_transaction``). Readers with
  ``read_committed`` see all of it or none of it.
- ``at_least_once``: the records are sent with ``acks=all`` on an idempotent producer, every
  acknowledgement is awaited, then the offsets are committed through the consumer.

Either way an offset is committed only after the records that finish its event are safe.

No record can block a cycle (issue 9): every record is measured as Kafka counts it before
it is sent, and one over ``kafka.max_request_size`` is replaced by its bounded form
(``connector.bounds``). A record the producer still refuses (``send`` raises
``MessageSizeTooLargeError`` before anything is queued) or the broker refuses (the error
comes back on its batch's future: topic limits changed under us) is replaced by its minimal
form. In a transaction a refused batch leaves a gap in the producer's sequence numbers, so
the transaction is aborted, the producer replaced, and the cycle tried again. The start-up
check (``topics``) makes sure every output topic accepts what the producer may send, so
that path stays the exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    IllegalOperation,
    InvalidMessageError,
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
    TransactionalIdAuthorizationFailed,
)

from connector.bounds import bound, minimal_dead_letter, minimal_result, out_size
from connector.config import ConnectorSettings, DeliveryMode
from connector.errors import FencedError
from connector.events import OutRecord, TopicPartitionKey
from connector.metrics import Metrics
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


class CommitError(FencedError):
    """A commit cycle failed: the session restarts from the last committed offsets."""


Refusal = tuple[OutRecord, BaseException]
MAX_REFUSAL_RETRIES = 3


class _Refused(Exception):
    """Records the broker refused inside a transaction (which is then aborted)."""

    def __init__(self, refused: list[Refusal]) -> None:
        super().__init__(f"{len(refused)} record(s) refused")
        self.refused = refused


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
        self._oversize_value = k.oversize_value
        self._results_topic = k.results_topic
        self._dead_topic = k.dead_letter_topic
        self.bounded = 0  # outcome records replaced by a bounded form
        self.dropped = 0  # changelog records too large to write
        self._exactly_once = d.mode is DeliveryMode.EXACTLY_ONCE
        self._source = source
        self.transactional_id = (
            f"{d.transactional_id_prefix}-{d.instance_id}{transactional_suffix}"
            if self._exactly_once
            else None
        )
        self._producer_kwargs: dict[str, object] = {
            **kafka_kwargs,
            "acks": "all",
            "enable_idempotence": True,
            "transactional_id": self.transactional_id,
            # a cycle queues all its records before it waits, so batches fill without a
            # linger (5 ms on every cycle's latency), and one batch per partition holds a
            # whole cycle: aiokafka keeps one batch per partition and a full one waits for
            # the previous to be acknowledged (16 KiB: a round trip per 16 KiB per cycle)
            "linger_ms": 0,
            "retry_backoff_ms": k.producer_retry_backoff_ms,
            "max_batch_size": k.max_request_size,
            "max_request_size": k.max_request_size,
        }
        self._producer = AIOKafkaProducer(**self._producer_kwargs)

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
        # all, so the positions are known before the records are acknowledged and go out
        # beside them: a cycle waits for AddPartitions, then the produce requests and
        # AddOffsets + TxnOffsetCommit side by side, then EndTxn (bench/latency.py)
        positions = finish()
        for _attempt in range(MAX_REFUSAL_RETRIES):
            try:
                await self._transaction(records, positions)
                return positions
            except _Refused as exc:
                records = self._replace(records, exc.refused)
                await self._renew_producer()
        raise CommitError(f"records refused {MAX_REFUSAL_RETRIES} times, even in minimal form")

    async def _transaction(self, records: Sequence[OutRecord], positions: Positions) -> None:
        producer = self._producer
        try:
            await producer.begin_transaction()
            try:
                refused, _ = await asyncio.gather(
                    self._publish(records), self._send_offsets(producer, positions)
                )
                if refused:
                    raise _Refused(refused)
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
            await self._resend_minimal(await self._publish(records))
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

    async def _send(self, record: OutRecord) -> asyncio.Future[object] | None:
        """Queue one record. One the producer refuses on its own (nothing was queued, so
        no batch or transaction is harmed) is replaced by its minimal form."""
        try:
            return await self._queue(record)
        except MessageSizeTooLargeError as exc:
            replacement = self._minimal(record, str(exc))
            log.warning(
                "the producer refused a record for %s (%s): %s",
                record.topic,
                exc,
                "writing its minimal form" if replacement else "left out",
            )
            if replacement is None:
                self._count(record, "left_out")
                return None
            self._count(record, "bounded")
            return await self._queue(replacement)

    async def _publish(self, records: Sequence[OutRecord]) -> list[Refusal]:
        """Send every record and wait for every acknowledgement; return the records the
        broker refused on their own (any other error propagates). Unawaited, a refused
        batch's future failed silently and the transaction committed without its record."""
        sent: list[tuple[OutRecord, asyncio.Future[object]]] = []
        try:
            for record in records:
                if (future := await self._send(record)) is not None:
                    sent.append((record, future))
        except BaseException:
            for _, future in sent:  # their failures are this one's; retrieved, not logged
                future.add_done_callback(_retrieve)
            raise
        answers = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        refused: list[Refusal] = []
        for (record, _), answer in zip(sent, answers, strict=True):
            if isinstance(answer, RECORD_ERRORS):
                refused.append((record, answer))
            elif isinstance(answer, BaseException):
                raise answer
        return refused

    def _replace(self, records: list[OutRecord], refused: list[Refusal]) -> list[OutRecord]:
        reasons = {id(record): exc for record, exc in refused}
        out = []
        for record in records:
            exc = reasons.get(id(record))
            if exc is None:
                out.append(record)
                continue
            replacement = self._minimal(record, f"{type(exc).__name__}: {exc}")
            log.warning(
                "the broker refused a record for %s (%s): %s; the cycle is tried again",
                record.topic,
                exc,
                "writing its minimal form" if replacement else "left out",
            )
            if replacement is None:
                self._count(record, "left_out")
            else:
                self._count(record, "bounded")
                out.append(replacement)
        return out

    async def _renew_producer(self) -> None:
        await self._producer.stop()
        self._producer = AIOKafkaProducer(**self._producer_kwargs)
        await self.start()

    async def _resend_minimal(self, refused: list[Refusal]) -> None:
        """Records the broker refused: their minimal forms instead."""
        futures = []
        for record, exc in refused:
            replacement = self._minimal(record, f"{type(exc).__name__}: {exc}")
            log.warning(
                "the broker refused a record for %s (%s): %s",
                record.topic,
                exc,
                "writing its minimal form" if replacement else "left out",
            )
            if replacement is None:
                self._count(record, "left_out")
                continue
            self._count(record, "bounded")
            futures.append(await self._queue(replacement))
        await asyncio.gather(*futures)

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

    async def _queue(self, record: OutRecord) -> asyncio.Future[object]:
        future: asyncio.Future[object] = await self._producer.send(
            record.topic,
            value=record.value,
            key=record.key,
            partition=record.partition,
            headers=list(record.headers),
        )
        return future


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
