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

Only events that produced a thread are remembered by id: a dead-lettered event can be
redriven after a fix without being dropped as a duplicate. A dead letter is remembered by
its *source coordinates* instead (``DeadLetterMarks``): the committed position only moves
over a contiguous run, so a dead letter written above it would be written again when the
tail is replayed. A redriven copy has a new offset, so it is processed again. Marks are
only needed above the committed position: they are pruned (and tombstoned in the
changelog) once the position passes them, which keeps them bounded by the uncommitted tail.

Keys: an event id is keyed by its JSON encoding (``5`` and ``"5"`` differ). The changelog
values written since then carry ``"v": 2``; an entry without it was written by the old
code, whose key is the raw string (see ``ChangelogDedupStore.restore``). A dead-letter
mark's key starts with the byte 0xFF, which no UTF-8 text (an old key) can start with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import orjson

from connector.events import OutRecord, TopicPartitionKey, dedup_key

log = logging.getLogger(__name__)
Clock = Callable[[], float]
CHANGELOG_VERSION = 2  # keys are the id's JSON encoding (version 1: the raw string)
MARK_PREFIX = b"\xffdl:"  # + the source offset: a dead letter's mark


@dataclass(frozen=True, slots=True)
class Seen:
    """An event already turned into a thread. ``event_id`` is its dedup key (the id's
    JSON encoding, ``Event.dedup_key``)."""

    event_id: str
    seen_at: float  # epoch seconds
    thread_uid: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {"t": self.seen_at, "threadUid": self.thread_uid, "v": CHANGELOG_VERSION}
        )

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
        # a call's future is made when a second copy comes to wait for it (rarely)
        self._calls: dict[tuple[TopicPartitionKey, str], asyncio.Future[None] | None] = {}

    def claim(self, tp: TopicPartitionKey, event_id: str) -> asyncio.Future[None] | None:
        """None: the caller owns the call. A future: wait for the owner to finish."""
        key = (tp, event_id)
        calls = self._calls
        if key not in calls:
            calls[key] = None
            return None
        existing = calls[key]
        if existing is None:
            existing = calls[key] = asyncio.get_running_loop().create_future()
        return existing

    def release(self, tp: TopicPartitionKey, event_id: str) -> None:
        future = self._calls.pop((tp, event_id), None)
        if future is not None and not future.done():
            future.set_result(None)

    def __len__(self) -> int:
        return len(self._calls)


class DeadLetterMarks:
    """Offsets dead-lettered above the committed position, per partition."""

    def __init__(self) -> None:
        self._marks: dict[TopicPartitionKey, set[int]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._marks.values())

    def __contains__(self, item: tuple[TopicPartitionKey, int]) -> bool:
        tp, offset = item
        marks = self._marks.get(tp)
        return marks is not None and offset in marks

    def add(self, tp: TopicPartitionKey, offset: int) -> None:
        self._marks.setdefault(tp, set()).add(offset)

    def discard(self, tp: TopicPartitionKey, offset: int) -> None:
        marks = self._marks.get(tp)
        if marks is not None:
            marks.discard(offset)

    def prune(self, tp: TopicPartitionKey, position: int) -> list[int]:
        """Drop the marks below ``position`` (committed: never replayed); return them."""
        marks = self._marks.get(tp)
        if not marks:
            return []
        gone = [offset for offset in marks if offset < position]
        marks.difference_update(gone)
        return gone

    def drop(self, tps: Iterable[TopicPartitionKey]) -> None:
        for tp in tps:
            self._marks.pop(tp, None)


def mark_key(offset: int) -> bytes:
    return MARK_PREFIX + str(offset).encode()


class DedupStore(Protocol):
    """What the pipeline needs of a dedup store."""

    window: DedupWindow
    marks: DeadLetterMarks

    def dead_lettered(self, tp: TopicPartitionKey, offset: int) -> bool:
        """Whether the record at these coordinates was dead-lettered already."""
        ...

    def remember_dead_letter(self, tp: TopicPartitionKey, offset: int) -> OutRecord | None:
        """Mark the record dead-lettered; return the changelog record to write with it."""
        ...

    def prune(self, positions: dict[TopicPartitionKey, int]) -> None:
        """Committed positions moved: the marks below them are no longer needed."""
        ...

    def take_tombstones(self) -> list[OutRecord]:
        """Changelog tombstones for pruned marks, to write in the next commit cycle."""
        ...

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
        self.marks = DeadLetterMarks()

    async def restore(self, tps: Iterable[TopicPartitionKey]) -> int:
        return 0

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        tps = list(tps)
        self.window.drop(tps)
        self.marks.drop(tps)

    def dead_lettered(self, tp: TopicPartitionKey, offset: int) -> bool:
        return (tp, offset) in self.marks

    def remember_dead_letter(self, tp: TopicPartitionKey, offset: int) -> OutRecord | None:
        self.marks.add(tp, offset)
        return None

    def prune(self, positions: dict[TopicPartitionKey, int]) -> None:
        for tp, position in positions.items():
            self.marks.prune(tp, position)

    def take_tombstones(self) -> list[OutRecord]:
        return []

    def seen(self, tp: TopicPartitionKey, event_id: str) -> float | None:
        return self.window.get(tp, event_id)

    def remember(self, tp: TopicPartitionKey, seen: Seen) -> OutRecord | None:
        self.window.add(tp, seen)
        return None


# changelog partition, key, value (None value: tombstone)
ChangelogEntry = tuple[TopicPartitionKey, bytes | None, bytes | None]
# reads the given changelog partitions to their ends; each partition's entries in order
ChangelogReader = Callable[[Sequence[TopicPartitionKey]], AsyncGenerator[ChangelogEntry, None]]


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
        self._tombstones: list[OutRecord] = []

    async def restore(self, tps: Iterable[TopicPartitionKey]) -> int:
        # a changelog partition is its input partition's (co-partitioned)
        inputs = {(self._topic_for(topic), part): (topic, part) for topic, part in tps}
        restored = unreadable = 0
        async with aclosing(self._reader(list(inputs))) as entries:
            async for changelog_tp, key, value in entries:
                if key is None:
                    continue
                tp = inputs[changelog_tp]  # outside the try: a wrong mapping is a bug
                try:
                    restored += self._apply(tp, key, value)
                except (ValueError, KeyError, TypeError, AttributeError):
                    # not an entry of ours (written by hand, by another tool, corrupted):
                    # skipped, or every restore of the partition failed and the replica
                    # restarted its session for ever; the entry's event, if any, loses
                    # only its dedup (a replay of it could create a second thread)
                    unreadable += 1
        if unreadable:
            log.warning("dedup restore skipped %d changelog entries it could not read", unreadable)
        return restored

    def _apply(self, tp: TopicPartitionKey, key: bytes, value: bytes | None) -> bool:
        """One changelog entry into the window or the dead-letter marks; True if it
        restored a live dedup entry."""
        if key.startswith(MARK_PREFIX):
            offset = int(key[len(MARK_PREFIX) :])
            if value is None:
                self.marks.discard(tp, offset)
            else:
                self.marks.add(tp, offset)
            return False
        keys = _restored_keys(key, value)
        seen = None if value is None else Seen.decode(keys[0], value)
        if seen is None or not self.window.is_live(seen.seen_at):
            # a tombstone, or an entry past the window that compaction has not removed
            # yet: neither takes memory
            for k in keys:
                self.window.discard(tp, k)
            return False
        for k in keys:
            self.window.add(tp, Seen(k, seen.seen_at, seen.thread_uid))
        return True

    def remember_dead_letter(self, tp: TopicPartitionKey, offset: int) -> OutRecord | None:
        self.marks.add(tp, offset)
        topic, partition = tp
        value = orjson.dumps({"t": self.window.now(), "v": CHANGELOG_VERSION})
        return OutRecord(self._topic_for(topic), mark_key(offset), value, partition=partition)

    def prune(self, positions: dict[TopicPartitionKey, int]) -> None:
        for tp, position in positions.items():
            topic, partition = tp
            for offset in self.marks.prune(tp, position):
                self._tombstones.append(
                    OutRecord(self._topic_for(topic), mark_key(offset), None, partition=partition)
                )

    def take_tombstones(self) -> list[OutRecord]:
        tombstones, self._tombstones = self._tombstones, []
        return tombstones

    def remember(self, tp: TopicPartitionKey, seen: Seen) -> OutRecord | None:
        self.window.add(tp, seen)
        topic, partition = tp
        return OutRecord(
            topic=self._topic_for(topic),
            key=seen.event_id.encode(),
            value=seen.encode(),
            partition=partition,
        )


def _restored_keys(key: bytes, value: bytes | None) -> list[str]:
    """The dedup keys a changelog entry stands for.

    Version 2 entries are keyed by the id's JSON encoding. The old code keyed by the raw
    string, and turned the integer 5 and the string "5" into the same "5": such an entry
    (or a tombstone, whose version is unknown) stands for the string and, when the text is
    an integer, for the integer too -- better to drop a replay of either than to create
    its thread twice across the upgrade (until the entry expires).
    """
    text = key.decode("utf-8", "replace")
    if value is not None and orjson.loads(value).get("v", 1) >= CHANGELOG_VERSION:
        return [text]
    keys = [dedup_key(text)]
    if value is None:
        keys.append(text)  # a version 2 key
    if _is_int_text(text):
        keys.append(text)
    return list(dict.fromkeys(keys))


def _is_int_text(text: str) -> bool:
    try:
        return str(int(text)) == text
    except ValueError:
        return False
