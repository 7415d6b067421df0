"""Reads the dead-letter topic with ``read_committed``, from given offsets to the end the
topic had when the read began (its last stable offset), partition by partition.

Records dead-lettered while a command runs are left for the next run: a redrive
finishes even while the connector keeps dead-lettering, and its position stays exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from connector.config import ConnectorSettings
from connector.dlq.records import DeadLetter
from connector.errors import ConnectorError
from connector.kafka_common import client_kwargs

STALL_TIMEOUT_S = 60.0


class DlqError(ConnectorError):
    """The dead-letter topic cannot be read or written; the command stops."""


class DeadLetterReader:
    """A consumer without a group, assigned every partition of the dead-letter topic."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self._settings = settings
        self.topic = settings.kafka.dead_letter_topic
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=settings.kafka.fetch_max_records,
        )
        self.partitions: list[int] = []
        self.log_start: dict[int, int] = {}
        self.ends: dict[int, int] = {}

    async def __aenter__(self) -> DeadLetterReader:
        try:
            await self._consumer.start()
            found = self._consumer.partitions_for_topic(self.topic)
            if not found:
                await self._consumer._client.force_metadata_update()
                found = self._consumer.partitions_for_topic(self.topic)
            if not found:
                raise DlqError(f"dead-letter topic {self.topic!r} does not exist")
            self.partitions = sorted(found)
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            self._consumer.assign(tps)
            starts = await self._consumer.beginning_offsets(tps)
            ends = await self._consumer.end_offsets(tps)  # the LSO: read_committed
        except KafkaError as exc:
            await self._consumer.stop()
            raise DlqError(f"cannot read {self.topic!r}: {exc}") from exc
        except BaseException:
            await self._consumer.stop()
            raise
        self.log_start = {tp.partition: off for tp, off in starts.items()}
        self.ends = {tp.partition: off for tp, off in ends.items()}
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def read(self, starts: Mapping[int, int | None]) -> AsyncIterator[DeadLetter]:
        """Dead letters from ``starts`` (None: the beginning) up to ``self.ends``."""
        c = self._consumer
        todo: list[TopicPartition] = []
        for p in self.partitions:
            tp = TopicPartition(self.topic, p)
            start = starts.get(p)
            begin = self.log_start[p] if start is None else max(start, self.log_start[p])
            if begin < self.ends[p]:
                c.seek(tp, begin)
                todo.append(tp)
        c.pause(*[TopicPartition(self.topic, p) for p in self.partitions])
        c.resume(*todo)
        type_field = self._settings.event_type_field
        progress_at = time.monotonic()
        while todo:
            try:
                batch = await c.getmany(*todo, timeout_ms=500)
            except KafkaError as exc:
                raise DlqError(f"reading {self.topic!r} failed: {exc}") from exc
            for tp, messages in batch.items():
                end = self.ends[tp.partition]
                for m in messages:
                    if m.offset < end:
                        progress_at = time.monotonic()
                        yield _dead_letter(m, type_field)
            for tp in list(todo):
                if await c.position(tp) >= self.ends[tp.partition]:
                    todo.remove(tp)
                    c.pause(tp)
            if todo and time.monotonic() - progress_at > STALL_TIMEOUT_S:
                raise DlqError(f"no progress reading {self.topic!r} for {STALL_TIMEOUT_S:g} s")
            await asyncio.sleep(0)


def _dead_letter(m: Any, type_field: str) -> DeadLetter:
    return DeadLetter.from_kafka(
        m.topic,
        m.partition,
        m.offset,
        m.timestamp,
        m.key,
        m.value,
        m.headers or (),
        type_field=type_field,
    )
