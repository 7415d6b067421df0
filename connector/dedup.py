"""Dedup by event id, scoped to the consumer group.

- ``DedupWindow``: event ids seen within a time window, bounded by an entry count (the
  oldest are evicted first, and counted).
- ``InFlight``: copies of one event that are in flight together make one call; the later
  copies wait for the first.
- ``MemoryDedupStore``: the window alone (lost on restart).
- ``ChangelogDedupStore``: the window backed by a compacted changelog topic per input
  topic, co-partitioned with it (like a Kafka Streams state store). Its records are written
  in the same transaction as the results and the offsets; on assignment a partition's
  entries are restored before the partition is processed.

Only events that produced a thread are remembered: a dead-lettered event can be redriven
after a fix without being dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson

from connector.events import OutRecord, TopicPartitionKey

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Seen:
    """An event already turned into a thread."""

    event_id: str
    seen_at: float  # epoch seconds
    thread_uid: str

    def encode(self) -> bytes:
        return orjson.dumps({"t": self.seen_at, "threadUid": self.thread_uid})

    @classmethod
    def decode(cls, event_id: str, value: bytes) -> Seen:
        data = orjson.loads(value)
        return cls(event_id=event_id, seen_at=float(data["t"]), thread_uid=str(data["threadUid"]))


class DedupWindow:
    """Event ids per partition, expiring after ``ttl_s``, at most ``max_entries`` in all.

    An entry is only the time the event was seen, keyed by (partition, event id), with the
    partition tuples shared: about 200 bytes an entry (``bench/dedup_memory.py``).
    """

    def __init__(self, ttl_s: float, max_entries: int, clock: Clock = time.time) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[TopicPartitionKey, str], float] = OrderedDict()
        self._tps: dict[TopicPartitionKey, TopicPartitionKey] = {}
        self.evicted = 0  # dropped for the size bound before they expired
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        """The window's clock (epoch seconds): when an event is seen, by this window's time."""
        return self._clock()

    def is_live(self, seen_at: float) -> bool:
        """Whether an entry seen at ``seen_at`` is still inside the window."""
        return seen_at >= self._clock() - self._ttl

    def get(self, tp: TopicPartitionKey, event_id: str) -> float | None:
        """When the event was seen (epoch seconds), or None if not within the window."""
        key = (tp, event_id)
        seen_at = self._entries.get(key)
        if seen_at is None:
            return None
        if not self.is_live(seen_at):
            del self._entries[key]
            self.expired += 1
            return None
        return seen_at

    def add(self, tp: TopicPartitionKey, seen: Seen) -> None:
        key = (self._tps.setdefault(tp, tp), seen.event_id)
        self._entries[key] = seen.seen_at
        self._entries.move_to_end(key)
        self._trim()

    def discard(self, tp: TopicPartitionKey, event_id: str) -> None:
        self._entries.pop((tp, event_id), None)

    def clear(self) -> None:
        self._entries.clear()

    def drop(self, tps: Iterable[TopicPartitionKey]) -> None:
        gone = set(tps)
        if gone:
            for key in [k for k in self._entries if k[0] in gone]:
                del self._entries[key]

    def _trim(self) -> None:
        horizon = self._clock() - self._ttl
        entries = self._entries
        while entries:
            key, oldest = next(iter(entries.items()))
            if oldest < horizon:
                self.expired += 1
            elif len(entries) > self._max:
                self.evicted += 1
            else:
                break
            del entries[key]


class InFlight:
    """Collapses copies of an event that are in flight at once into one call."""

    def __init__(self) -> None:
        self._calls: dict[tuple[TopicPartitionKey, str], asyncio.Future[None]] = {}

    def claim(self, tp: TopicPartitionKey, event_id: str) -> asyncio.Future[None] | None:
        """None: the caller owns the call. A future: wait for the owner to finish."""
        key = (tp, event_id)
        existing = self._calls.get(key)
        if existing is not None:
            return existing
        self._calls[key] = asyncio.get_running_loop().create_future()
        return None

    def release(self, tp: TopicPartitionKey, event_id: str) -> None:
        future = self._calls.pop((tp, event_id), None)
        if future is not None and not future.done():
            future.set_result(None)

    def __len__(self) -> int:
        return len(self._calls)


class DedupStore(Protocol):
    """What the pipeline needs of a dedup store."""

    window: DedupWindow

    async def restore(self, tps: Iterable[TopicPartitionKey]) -> int: ...

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None: ...

    def seen(self, tp: TopicPartitionKey, event_id: str) -> float | None:
        """When the event was turned into a thread, if within the window."""
        ...

    def remember(self, tp: TopicPartitionKey, seen: Seen) -> OutRecord | None:
        """Record the event; return the changelog record to write with its result."""
        ...


class MemoryDedupStore:
    """The window alone: dedup within a process's lifetime."""

    def __init__(self, window: DedupWindow) -> None:
        self.window = window

    async def restore(self, tps: Iterable[TopicPartitionKey]) -> int:
        return 0

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        self.window.drop(tps)

    def seen(self, tp: TopicPartitionKey, event_id: str) -> float | None:
        return self.window.get(tp, event_id)

    def remember(self, tp: TopicPartitionKey, seen: Seen) -> OutRecord | None:
        self.window.add(tp, seen)
        return None


ChangelogEntry = tuple[bytes | None, bytes | None]  # key, value (None value: tombstone)
ChangelogReader = Callable[[str, int], AsyncIterator[ChangelogEntry]]


def changelog_topic(group_id: str, input_topic: str, suffix: str) -> str:
    """``<group>-<input topic>-<suffix>``: one changelog per input topic, per group."""
    return f"{group_id}-{input_topic}-{suffix}"


class ChangelogDedupStore(MemoryDedupStore):
    """The window, made durable by a compacted changelog topic co-partitioned with the input."""

    def __init__(
        self, window: DedupWindow, topic_for: Callable[[str], str], reader: ChangelogReader
    ) -> None:
        super().__init__(window)
        self._topic_for = topic_for
        self._reader = reader

    async def restore(self, tps: Iterable[TopicPartitionKey]) -> int:
        restored = 0
        for topic, partition in tps:
            tp = (topic, partition)
            async for key, value in self._reader(self._topic_for(topic), partition):
                if key is None:
                    continue
                event_id = key.decode("utf-8", "replace")
                seen = None if value is None else Seen.decode(event_id, value)
                if seen is None or not self.window.is_live(seen.seen_at):
                    # a tombstone, or an entry past the window that compaction has not
                    # removed yet: neither takes memory
                    self.window.discard(tp, event_id)
                    continue
                self.window.add(tp, seen)
                restored += 1
        return restored

    def remember(self, tp: TopicPartitionKey, seen: Seen) -> OutRecord | None:
        self.window.add(tp, seen)
        topic, partition = tp
        return OutRecord(
            topic=self._topic_for(topic),
            key=seen.event_id.encode(),
            value=seen.encode(),
            partition=partition,
        )
