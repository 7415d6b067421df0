"""Per-partition completion tracking → commit positions.

Calls complete out of order, so a partition's commit position is the offset after the
highest *contiguous* completed one (the technique of Confluent's Parallel Consumer). A
crash replays at most the uncommitted tail, which the dedup store makes harmless.
"""

from __future__ import annotations

from collections import deque

from connector.events import TopicPartitionKey


class _Partition:
    __slots__ = ("committed", "done", "order", "position")

    def __init__(self) -> None:
        self.order: deque[int] = deque()  # offsets handed out, in fetch order
        self.done: set[int] = set()
        self.position: int | None = None  # next offset to read, as far as done allows
        self.committed: int | None = None

    def advance(self) -> None:
        order, done = self.order, self.done
        while order and order[0] in done:
            offset = order.popleft()
            done.discard(offset)
            self.position = offset + 1


class OffsetTracker:
    """Which fetched offsets are finished, and what may be committed."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartitionKey, _Partition] = {}

    def add(self, tp: TopicPartitionKey, offset: int) -> None:
        """A record was fetched and handed to the pipeline (offsets rise per partition)."""
        part = self._parts.setdefault(tp, _Partition())
        last = (
            part.order[-1] if part.order else (None if part.position is None else part.position - 1)
        )
        if last is not None and offset <= last:
            raise ValueError(f"{tp}: offset {offset} is not after {last}")
        part.order.append(offset)

    def done(self, tp: TopicPartitionKey, offset: int) -> None:
        """The record's event is finished: result, dead letter or dedup hit is durable."""
        part = self._parts.get(tp)
        if part is None:
            return  # partition revoked meanwhile; its work is replayed by the new owner
        part.done.add(offset)
        part.advance()

    def uncommitted(self) -> dict[TopicPartitionKey, int]:
        """Positions that moved since the last ``mark_committed``."""
        return {
            tp: p.position
            for tp, p in self._parts.items()
            if p.position is not None and p.position != p.committed
        }

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        for tp, position in positions.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = position

    def committed_position(self, tp: TopicPartitionKey) -> int | None:
        """The last position committed in this session, else the first offset fetched."""
        part = self._parts.get(tp)
        if part is None:
            return None
        if part.committed is not None:
            return part.committed
        return part.order[0] if part.order else part.position

    def skip_to(self, tp: TopicPartitionKey, position: int, committed: int | None) -> bool:
        """Move an idle partition's position up to the consumer's ``position``, past
        records the consumer never hands out (transaction markers, aborted records), so
        the next commit cycle commits it. ``committed``: the group's committed offset,
        for a partition this session has not seen. True if the position moved."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition()
            part.committed = committed
        if part.order:
            return False  # records in progress: their completion moves the position
        current = part.position if part.position is not None else part.committed
        if current is not None and position <= current:
            return False
        part.position = position
        return True

    def committed_positions(self) -> dict[TopicPartitionKey, int]:
        """``committed_position`` of every partition that has one (a no-op to commit)."""
        out = {}
        for tp in self._parts:
            position = self.committed_position(tp)
            if position is not None:
                out[tp] = position
        return out

    def pending(self, tp: TopicPartitionKey | None = None) -> int:
        """Records fetched but not finished (one partition, or all)."""
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.order) if part else 0
        return sum(len(p.order) for p in self._parts.values())

    def lag_behind_fetch(self, tp: TopicPartitionKey) -> int:
        """Finished out of order but not yet committable (waiting for a gap to close)."""
        part = self._parts.get(tp)
        return len(part.done) if part else 0

    def drop(self, tp: TopicPartitionKey) -> None:
        """Forget a revoked partition."""
        self._parts.pop(tp, None)

    def partitions(self) -> list[TopicPartitionKey]:
        return list(self._parts)
