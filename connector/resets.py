"""Positions the consumer cannot use: no committed offset, or one out of range.

The consumer runs with aiokafka's ``auto_offset_reset="none"``, so neither is resolved
silently inside aiokafka (its one INFO line about a reset is hidden at the connector's log
level): ``getmany`` raises, and ``Source`` hands the error here.

- No committed offset (a new group, or a new partition): ``kafka.auto_offset_reset``, as
  the Kafka client would.
- Out of range (records deleted past the position by retention or delete-records, or the
  log truncated below it): ``kafka.offset_out_of_range`` decides. ``reset_earliest`` goes on
  from the log start, with a WARNING naming the partition and the number of offsets
  skipped, counted in ``offsets_skipped_total``; ``stop`` pauses the partition and turns
  readiness red naming it (``connector.progress``) for an operator to decide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, NoOffsetForPartitionError, OffsetOutOfRangeError

from connector.config import ConnectorSettings
from connector.metrics import Metrics
from connector.progress import PartitionProgress

log = logging.getLogger(__name__)
Moved = Callable[[TopicPartition, int], None]


class PositionResets:
    """Resolves the consumer's position errors (see the module docstring)."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        settings: ConnectorSettings,
        metrics: Metrics,
        progress: PartitionProgress,
        moved: Moved,
        epoch: Callable[[], int],
    ) -> None:
        """``moved``: told each new position (the connector's own next offset).
        ``epoch``: moves at each revocation and assignment. A rebalance during a reset's
        awaits (replicas of a new group starting together) leaves the partition to its
        next owner, who meets the same error: acting on it raised "not assigned" and ended
        the session, or stopped a partition that was not ours any more. Likewise an error
        aiokafka raises, right after a rebalance, for a partition of the assignment before."""
        self._consumer = consumer
        self._settings = settings
        self._m = metrics
        self._progress = progress
        self._moved = moved
        self._epoch = epoch

    async def no_offset(self, error: NoOffsetForPartitionError) -> None:
        tp = error.args[0] if error.args else None
        if not isinstance(tp, TopicPartition):
            raise error
        consumer = self._consumer
        if tp not in consumer.assignment():
            return  # an error of the assignment before (aiokafka may still raise it)
        epoch = self._epoch()
        try:
            if self._settings.kafka.auto_offset_reset == "earliest":
                await consumer.seek_to_beginning(tp)
            else:
                await consumer.seek_to_end(tp)
            if self._epoch() != epoch:
                return
            position = await consumer.position(tp)
        except (IllegalStateError, AssertionError):
            if self._epoch() == epoch:
                raise
            return  # revoked meanwhile: see __init__
        self._moved(tp, position)

    async def out_of_range(self, error: OffsetOutOfRangeError) -> None:
        positions = error.args[0] if error.args else None
        if not isinstance(positions, dict):
            raise error
        for tp, offset in positions.items():
            await self._one(tp, int(offset))

    async def _one(self, tp: TopicPartition, offset: int) -> None:
        consumer = self._consumer
        if tp not in consumer.assignment():
            return  # an error of the assignment before (aiokafka may still raise it)
        stop = self._settings.kafka.offset_out_of_range == "stop"
        if stop:
            if self._progress.is_stopped((tp.topic, tp.partition)):
                return  # a fetch already under way when it was paused said it again
            consumer.pause(tp)
        # (a reset seeks: that drops a second error fetched meanwhile for the old offset)
        epoch = self._epoch()
        try:
            start = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
        except (IllegalStateError, AssertionError):
            if self._epoch() == epoch:
                raise
        if self._epoch() != epoch:
            return  # revoked meanwhile: see __init__
        name = f"{tp.topic}/{tp.partition}"
        if stop:
            why = f"offset {offset} out of range, the log holds {start}-{end}"
            self._progress.stop((tp.topic, tp.partition), why)
            log.warning(
                "partition %s stopped: its offset %d is out of range (the log now holds "
                "offsets %d to %d; records deleted by retention or delete-records?). "
                "kafka.offset_out_of_range is stop: nothing of it is read until an operator "
                "resets the group's offset or sets reset_earliest",
                name, offset, start, end,
            )  # fmt: skip
            return
        skipped = max(0, start - offset)
        consumer.seek(tp, start)
        self._moved(tp, start)
        self._m.offsets_skipped.labels(tp.topic, str(tp.partition)).inc(skipped)
        if offset < start:
            log.warning(
                "partition %s: offset %d is out of range (the log now starts at %d: records "
                "deleted by retention or delete-records); %d offsets skipped, never processed",
                name, offset, start, skipped,
            )  # fmt: skip
        else:
            log.warning(
                "partition %s: offset %d is past the log's end %d (log truncated or topic "
                "re-created); reading again from the log start %d",
                name, offset, end, start,
            )  # fmt: skip
