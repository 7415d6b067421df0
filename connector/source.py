"""The input side of Kafka: the group consumer, its rebalance hooks, the changelog reader.

With ``source.py`` and ``sink.py`` the only modules that talk to Kafka; aiokafka's errors
that matter to the flow are translated here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)

from connector.config import ConnectorSettings, DeliveryMode
from connector.errors import FencedError
from connector.events import InputRecord, TopicPartitionKey
from connector.fencing import require_stable
from connector.kafka_common import client_kwargs
from connector.kip447 import GroupMember
from connector.metrics import Metrics
from connector.progress import PartitionProgress
from connector.resets import PositionResets
from connector.undecodable import UNDECODABLE, FetchGuard
from connector.undecodable import input_record as _record

log = logging.getLogger(__name__)
PartitionsHook = Callable[[list[TopicPartitionKey]], Awaitable[None]]
READER_FETCH_MAX_BYTES = 16 * 1024 * 1024
READER_BATCH_RECORDS = 2_000
# a partition's last-fetch figures (LSO, high watermark) older than this are asked for
# again before they say it is blocked (``watch_progress``)
FRESH_MS = 5_000


class _Listener:
    """aiokafka's rebalance hooks (registered as a virtual ConsumerRebalanceListener)."""

    def __init__(
        self,
        on_revoked: PartitionsHook,
        on_assigned: PartitionsHook,
        joined: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._joined = joined

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._on_revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._joined()  # before anything of the new assignment can be committed
        await self._on_assigned([(tp.topic, tp.partition) for tp in assigned])


ConsumerRebalanceListener.register(_Listener)


def _tp(key: TopicPartitionKey) -> TopicPartition:
    return TopicPartition(key[0], key[1])


class Source:
    """The consumer group member: fetch, pause/resume, commit (at-least-once mode)."""

    def __init__(
        self,
        settings: ConnectorSettings,
        on_revoked: PartitionsHook,
        on_assigned: PartitionsHook,
        metrics: Metrics | None = None,
        progress: PartitionProgress | None = None,
    ) -> None:
        """``progress``: where partitions stopped by ``kafka.offset_out_of_range`` are
        named (``connector.progress``)."""
        k = settings.kafka
        metrics = metrics or Metrics()
        self.progress = progress or PartitionProgress(metrics, k.blocked_partition_after_s)
        self._settings = settings
        rebalance_ms = max(
            k.session_timeout_ms, int(settings.delivery.revoke_timeout_s * 1000) + 10_000
        )
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(settings),
            group_id=k.group_id,
            # static membership: aiokafka then sends no LeaveGroup when it stops (the
            # member is kept for session_timeout_ms, for the replica to come back)
            group_instance_id=k.static_instance_id(),
            enable_auto_commit=False,
            # no reset inside aiokafka: ``connector.resets`` makes them, loudly
            auto_offset_reset="none",
            isolation_level="read_committed",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            rebalance_timeout_ms=rebalance_ms,
            max_poll_records=k.fetch_max_records,
            metadata_max_age_ms=k.metadata_max_age_ms,
        )
        self._exactly_once = settings.delivery.mode is DeliveryMode.EXACTLY_ONCE
        self._member: GroupMember | None = None
        # the way past records aiokafka cannot decode
        self._guard = FetchGuard(self._consumer)
        self._resets = PositionResets(
            self._consumer,
            settings,
            metrics,
            self.progress,
            self._guard.moved,
            lambda: self._guard.epoch,
        )

        async def revoked(tps: list[TopicPartitionKey]) -> None:
            self._guard.forget(_tp(t) for t in tps)
            self.progress.forget(tps)
            await on_revoked(tps)

        async def assigned(tps: list[TopicPartitionKey]) -> None:
            self._guard.forget(_tp(t) for t in tps)
            await on_assigned(tps)

        self._listener = _Listener(revoked, assigned, self._joined)

    async def start(self) -> None:
        await self._consumer.start()
        if self._exactly_once:  # before the first assignment (``subscribe``)
            require_stable(self._consumer)
        self._consumer.subscribe(list(self._settings.kafka.input_topics), listener=self._listener)

    async def stop(self) -> None:
        await self._consumer.stop()  # leaves the group

    @property
    def group_id(self) -> str:
        return self._settings.kafka.group_id

    def member(self) -> GroupMember | None:
        """Who we were in the group when given the current assignment (``fencing``): the
        transactional offsets are committed as this member."""
        return self._member

    def _joined(self) -> None:
        coordinator = self._consumer._coordinator  # aiokafka has no public accessor
        self._member = GroupMember(
            coordinator.generation,
            coordinator.member_id,
            self._settings.kafka.static_instance_id(),
        )

    async def fetch(self, timeout_ms: int, max_records: int | None = None) -> list[InputRecord]:
        """At most ``kafka.fetch_max_records`` records, and at most ``max_records``."""
        limit = self._settings.kafka.fetch_max_records
        if max_records is not None:
            limit = max(1, min(limit, max_records))
        return await self._getmany(timeout_ms=timeout_ms, max_records=limit)

    async def keep_alive(self, timeout_ms: int) -> list[InputRecord]:
        """Poll only paused partitions: no record comes back (unless a rebalance gave one
        back unpaused meanwhile), but the poll keeps the member in the group."""
        paused = sorted(self._consumer.paused(), key=lambda tp: (tp.topic, tp.partition))
        if not paused:
            await asyncio.sleep(timeout_ms / 1000)
            return []
        return await self._getmany(paused[0], timeout_ms=timeout_ms, max_records=1)

    async def _getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> list[InputRecord]:
        """aiokafka's ``getmany``, with the errors that would stop a partition for ever
        (or the whole connector) resolved: undecodable records, positions unknown or out
        of range. Such a round returns what it could read, possibly nothing."""
        consumer = self._consumer
        try:
            batches = await consumer.getmany(
                *partitions, timeout_ms=timeout_ms, max_records=max_records
            )
        except UNDECODABLE as exc:
            return await self._guard.recover(exc, max_records)
        except OffsetOutOfRangeError as exc:
            await self._resets.out_of_range(exc)
            return []
        except NoOffsetForPartitionError as exc:
            await self._resets.no_offset(exc)
            return []
        self._guard.note(batches)
        return [_record(m) for msgs in batches.values() for m in msgs]

    def assignment(self) -> list[TopicPartitionKey]:
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    def pause(self, tps: Iterable[TopicPartitionKey]) -> None:
        self._consumer.pause(*[_tp(t) for t in tps])

    def resume(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Resume, except partitions stopped for an operator (``kafka.offset_out_of_range``)."""
        progress = self.progress
        self._consumer.resume(*[_tp(t) for t in tps if not progress.is_stopped(t)])

    def paused(self) -> int:
        return len(self._consumer.paused())

    def highwater(self, tp: TopicPartitionKey) -> int | None:
        """The partition's end offset as last fetched; None when not known, or when the
        partition was revoked since ``assignment()`` listed it (aiokafka asserts)."""
        try:
            value = self._consumer.highwater(_tp(tp))
        except (AssertionError, IllegalStateError):
            return None
        return int(value) if value is not None else None

    async def watch_progress(self) -> None:
        """Tell ``progress`` each assigned partition's position, last stable offset (LSO)
        and high watermark. Being paused is no verdict: backpressure keeps every partition
        paused most of the time while another one has a backlog, and aiokafka then fetches
        none of them. So where the last fetch's figures are older than ``FRESH_MS`` and
        show records beyond the LSO, the LSO is asked for again (a ``read_committed``
        ListOffsets): the same LSO with the position at it is still blocked, a new one is
        not (the high watermark only grows). Not known (the request failed): the last
        verdict holds."""
        consumer = self._consumer
        epoch = self._guard.epoch  # a rebalance during an await: its figures are gone
        now_ms = time.time() * 1000
        figures: dict[TopicPartition, tuple[int | None, int | None]] = {}
        stale: list[TopicPartition] = []
        for tp in list(consumer.assignment()):
            try:
                lso, high = consumer.last_stable_offset(tp), consumer.highwater(tp)
                fetched_ms = consumer.last_poll_timestamp(tp)
            except (AssertionError, IllegalStateError):
                continue  # revoked meanwhile
            figures[tp] = (lso, high)
            old = fetched_ms is None or now_ms - fetched_ms > FRESH_MS
            if old and lso is not None and high is not None and high > lso:
                stale.append(tp)
        unknown: set[TopicPartition] = set()
        if stale:
            try:
                lsos = await asyncio.wait_for(consumer.end_offsets(stale), FRESH_MS / 1000)
            except (KafkaError, TimeoutError, AssertionError):
                unknown.update(stale)
            else:
                for tp, lso in lsos.items():
                    figures[tp] = (lso, figures[tp][1])
        for tp, (lso, high) in figures.items():
            key = (tp.topic, tp.partition)
            position = None
            if tp not in unknown and lso is not None and high is not None and high > lso:
                position = await self.position(key)
            if self._guard.epoch != epoch:
                return  # revoked meanwhile: observed, it would be named as ours again
            self.progress.observe(key, position, lso, high)

    async def position(self, tp: TopicPartitionKey, timeout_s: float = 2.0) -> int | None:
        """The next offset the consumer will hand out (past transaction markers), or None
        when the partition is not assigned any more or its position is not known yet (or
        not the connector's: while a fetch finds its way past an undecodable record)."""
        if self._guard.busy:
            return None
        try:
            value = await asyncio.wait_for(self._consumer.position(_tp(tp)), timeout_s)
        except (IllegalStateError, TimeoutError):
            return None
        return int(value)

    async def committed(self, tp: TopicPartitionKey) -> int | None:
        value = await self._consumer.committed(_tp(tp))
        return int(value) if value is not None else None

    async def commit(self, positions: dict[TopicPartitionKey, int]) -> None:
        """At-least-once mode: commit "next offset to read" per partition."""
        if self._settings.delivery.mode is DeliveryMode.EXACTLY_ONCE:
            raise RuntimeError("offsets are committed in the transaction in exactly_once mode")
        try:
            await self._consumer.commit({_tp(tp): pos for tp, pos in positions.items()})
        except CommitFailedError as exc:
            raise FencedError(f"offset commit refused, the group moved on: {exc}") from exc


class TopicReader:
    """Reads partitions from the beginning to their end offsets (read_committed), without
    a group: dedup restore reads changelogs with it, the demo reads the output topics.

    Each ``read`` has a consumer of its own, stopped when the read ends. One kept between
    reads had to be unassigned after each, and aiokafka's fetch loop swallows a cancel
    that lands while it drops an assignment: a ``stop`` right after a read hung for ever."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self._kwargs: dict[str, Any] = {
            **client_kwargs(settings),
            "group_id": None,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": 50,
            # every partition of a restore is fetched at once: bound what is buffered
            "fetch_max_bytes": READER_FETCH_MAX_BYTES,
        }

    async def read(
        self, partitions: Sequence[TopicPartitionKey], settle_s: float = 5.0
    ) -> AsyncGenerator[InputRecord, None]:
        """Yield the partitions' committed records up to their ends, all read at once
        (one at a time, a restore of 6 empty partitions took 0.6 s: a fetch wait each);
        each partition's records in offset order.

        Right after a transaction commits, its markers may not be written yet, so the last
        stable offset (LSO) can lag the high watermark for a moment: a partition is done
        when its LSO has caught up, or ``settle_s`` after it was read up to the LSO (what
        remains is then a transaction still open, e.g. of a crashed producer, which will be
        aborted)."""
        pending = {TopicPartition(t, p) for t, p in partitions}
        if not pending:
            return
        consumer = AIOKafkaConsumer(**self._kwargs)
        started = time.monotonic()
        at_lso_since: dict[TopicPartition, float] = {}
        try:
            await consumer.start()
            consumer.assign(list(pending))
            await consumer.seek_to_beginning(*pending)
            while pending:
                batch = await consumer.getmany(
                    *pending, timeout_ms=100, max_records=READER_BATCH_RECORDS
                )
                for msgs in batch.values():
                    for msg in msgs:
                        yield _record(msg)
                # getmany does not yield to the loop while records are buffered: one 16 MiB
                # fetch held the loop (health, metrics, calls under way) for 0.75 s
                await asyncio.sleep(0)
                now = time.monotonic()
                for tp in list(pending):
                    if await _read_to_end(consumer, tp, now, started, at_lso_since, settle_s):
                        pending.discard(tp)
                        consumer.pause(tp)  # nothing more of it is fetched
        except KafkaError as exc:
            names = ", ".join(f"{t}/{p}" for t, p in partitions)
            raise RuntimeError(f"cannot read {names}: {exc}") from exc
        finally:
            await _stop(consumer)

    async def read_changelog(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> AsyncGenerator[tuple[TopicPartitionKey, bytes | None, bytes | None], None]:
        async with aclosing(self.read(partitions)) as records:  # stopped now, not at GC
            async for record in records:
                yield record.tp, record.key, record.value

    async def read_topic(self, topic: str, partitions: int) -> list[InputRecord]:
        """Every committed record of every partition, in partition then offset order."""
        records = [r async for r in self.read([(topic, p) for p in range(partitions)])]
        return sorted(records, key=lambda r: (r.partition, r.offset))


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    now: float,
    started: float,
    at_lso_since: dict[TopicPartition, float],
    settle_s: float,
) -> bool:
    """Whether ``tp`` has been read to its end (see ``TopicReader.read``)."""
    lso = consumer.last_stable_offset(tp)
    high = consumer.highwater(tp)
    if lso is None or high is None:
        if now - started > settle_s:
            raise RuntimeError(f"no fetch response for {tp.topic}/{tp.partition}")
        return False
    if await consumer.position(tp) < lso:
        return False
    return lso >= high or now - at_lso_since.setdefault(tp, now) > settle_s


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a reader's consumer. aiokafka's fetcher, when stopped, cancels its fetch tasks and
    awaits them, and a task waiting out a failed fetch's backoff raises that cancel: ``stop``
    then ends in a ``CancelledError`` nobody asked for, before it closes the client (left
    running, a connection and a task), and the error stopped the whole connector. Here the
    client is closed all the same, and only a real cancel of ours goes on."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        await consumer._client.close()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
