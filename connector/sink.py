"""The output side of Kafka: results, dead letters and dedup records, and the commit cycle.

One commit cycle makes a batch of finished events durable and then commits their offsets:

- ``exactly_once``: one Kafka transaction holds the cycle's result, dead-letter and dedup
  records and the consumer offsets (``send_offsets_to_transaction``). Readers with
  ``read_committed`` see all of it or none of it.
- ``at_least_once``: the records are sent with ``acks=all`` on an idempotent producer, every
  acknowledgement is awaited, then the offsets are committed through the consumer.

Either way an offset is committed only after the records that finish its event are safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

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
        positions to commit), and commit those positions, atomically when transactional."""
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
            futures = [await self._send(record) for record in records]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise CommitError(f"publishing failed: {exc}") from exc
        positions = finish()
        if positions:
            await self._source.commit(positions)
        return positions

    async def _send(self, record: OutRecord) -> asyncio.Future[object]:
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
