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
(``connector.bounds``). A record the producer still refuses on its own (``send`` raises
``MessageSizeTooLargeError`` before anything is queued) is replaced by its minimal form.
Errors that come back on a batch's future are another matter: in a transaction a failed
batch leaves the producer's sequence with a gap, so the cycle aborts and the session
restarts. That is why the start-up check (``topics``) makes sure every output topic
accepts what the producer may send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from connector.bounds import bound, minimal_dead_letter, minimal_result, out_size
from connector.config import ConnectorSettings, DeliveryMode
from connector.errors import FencedError
from connector.events import OutRecord, TopicPartitionKey
from connector.source import Source

log = logging.getLogger(__name__)
FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
Positions = dict[TopicPartitionKey, int]


class CommitError(FencedError):
    """A commit cycle failed: the session restarts from the last committed offsets."""


class Sink:
    """The producer, transactional or not, and the commit cycle."""

    def __init__(
        self,
        settings: ConnectorSettings,
        source: Source,
        kafka_kwargs: dict[str, object],
        transactional_suffix: str = "",
    ) -> None:
        d = settings.delivery
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
        self._producer = AIOKafkaProducer(
            **kafka_kwargs,
            acks="all",
            enable_idempotence=True,
            transactional_id=self.transactional_id,
            linger_ms=5,
            max_request_size=k.max_request_size,
        )

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
        positions to commit), and commit those positions, atomically when transactional.
        Records too large are replaced by their bounded forms first."""
        records = self.fit(records)
        if self._exactly_once:
            return await self._transactional_cycle(records, finish)
        return await self._plain_cycle(records, finish)

    async def _transactional_cycle(
        self, records: Sequence[OutRecord], finish: Callable[[], Positions]
    ) -> Positions:
        producer = self._producer
        try:
            await producer.begin_transaction()
            try:
                for record in records:
                    await self._send(record)
                positions = finish()
                if positions:
                    await producer.send_offsets_to_transaction(
                        {TopicPartition(t, p): pos for (t, p), pos in positions.items()},
                        self._source.group_id,
                    )
                await producer.commit_transaction()
            except FENCED:
                raise  # the broker aborted it already; the producer cannot abort any more
            except BaseException:
                await _abort_quietly(producer)
                raise
        except FENCED as exc:
            raise FencedError(f"transactional producer fenced: {exc}") from exc
        except KafkaError as exc:
            raise CommitError(f"transaction failed and was aborted: {exc}") from exc
        return positions

    async def _plain_cycle(
        self, records: Sequence[OutRecord], finish: Callable[[], Positions]
    ) -> Positions:
        try:
            futures = [f for record in records if (f := await self._send(record)) is not None]
            await asyncio.gather(*futures)
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
                self.dropped += 1
                log.warning(
                    "a %d-byte record for %s is over kafka.max_request_size (%d): left out",
                    out_size(record),
                    record.topic,
                    self.max_request_size,
                )
                continue
            self.bounded += 1
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
                self.dropped += 1
                return None
            self.bounded += 1
            return await self._queue(replacement)

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


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.abort_transaction()
    except (KafkaError, AssertionError):  # aiokafka asserts on a producer in a fatal state
        log.warning("abort_transaction failed; the broker will time the transaction out")
