"""What earlier redrives did, per dead-letter partition: the redrive's committed position.

The position lives in Kafka, as the offsets of the consumer group ``<group>-redrive`` on
the dead-letter topic, and it is committed in the same transaction as the copies it
accounts for (``send_offsets_to_transaction``): copies and position become visible
together, or neither does. Running the same redrive twice therefore copies nothing the
second time.

A filter must not make the position pass records it left out (a user redriving
``--code no_route`` today expects the ``http_422`` dead letters to be redrivable
tomorrow). So the position is not one offset but, per partition:

- ``end``: every offset below it has been looked at by some redrive;
- ``skipped``: ranges ``[a, b]`` below ``end`` whose records a redrive left (filtered
  out, not redrivable by default, no source): they are still to do.

A record at offset ``o`` is *pending* (a later redrive may copy it) when ``o >= end`` or
``o`` lies in a skipped range. The committed offset is the start of the first skipped
range (else ``end``), so Kafka's own lag tools count from the first record still to do;
the offset's metadata string carries ``end`` and the ranges, delta-encoded in base 36
(about two characters a range when left-out records are single and close together).

A range may span offsets that hold no record for a ``read_committed`` reader
(transaction markers, aborted records): consecutive left-out records make one range
however many markers lie between them, which keeps the metadata small. Brokers cap
the metadata (``offset.metadata.max.bytes``, 4096 by default): above ``METADATA_BUDGET``
characters the oldest ranges are forgotten (the position passes them, a warning says
so, ``--again`` still reaches them).

A position reset with Kafka's tools (``kafka-consumer-groups --reset-offsets``) has no
metadata: it is taken as "everything below this offset is done".
"""

from __future__ import annotations

import bisect
import string
from dataclasses import dataclass, field

METADATA_PREFIX = "redrive/1:"
METADATA_BUDGET = 3000
_DIGITS = string.digits + string.ascii_lowercase


def _b36(number: int) -> str:
    if number < 0:
        raise ValueError(number)
    out = ""
    while True:
        number, rem = divmod(number, 36)
        out = _DIGITS[rem] + out
        if number == 0:
            return out


@dataclass
class PartitionLedger:
    """One dead-letter partition's position (see the module docstring)."""

    end: int = 0
    skipped: list[list[int]] = field(default_factory=list)  # [a, b] inclusive, sorted
    _prev: int | None = field(default=None, repr=False)  # last record seen in this run

    @property
    def committed(self) -> int:
        """The offset to commit: the first record still to do, or ``end``."""
        return self.skipped[0][0] if self.skipped else self.end

    def pending(self, offset: int) -> bool:
        """May a redrive copy the record at ``offset`` without ``--again``?"""
        return offset >= self.end or self._index(offset) is not None

    def record(self, offset: int, *, copied: bool) -> None:
        """A redrive looked at the record at ``offset`` (in offset order) and copied it or
        left it. A record done before stays done; one left stays to do."""
        if copied:
            self._remove(offset)
        elif offset >= self.end:
            last = self.skipped[-1] if self.skipped else None
            if last is not None and last[1] in (self._prev, offset - 1):
                last[1] = offset
            else:
                self.skipped.append([offset, offset])
        self.end = max(self.end, offset + 1)
        self._prev = offset

    def prune_below(self, log_start: int) -> None:
        """Forget ranges retention has deleted."""
        self.skipped = [r for r in self.skipped if r[1] >= log_start]
        if self.skipped and self.skipped[0][0] < log_start:
            self.skipped[0][0] = log_start

    def fit(self, budget: int = METADATA_BUDGET) -> int:
        """Drop the oldest ranges until the metadata fits; returns the offsets given up."""
        if len(self.metadata()) <= budget:
            return 0
        low, high = 1, len(self.skipped)  # drop `high` ranges: the metadata surely fits
        while low < high:
            mid = (low + high) // 2
            if len(_encode(self.end, self.skipped[mid:])) <= budget:
                high = mid
            else:
                low = mid + 1
        dropped, self.skipped = self.skipped[:low], self.skipped[low:]
        return sum(b - a + 1 for a, b in dropped)

    def metadata(self) -> str:
        return _encode(self.end, self.skipped)

    @classmethod
    def decode(cls, committed: int, metadata: str) -> PartitionLedger:
        """The ledger from a committed offset and its metadata (``committed < 0``: none)."""
        if committed < 0:
            return cls()
        if not metadata.startswith(METADATA_PREFIX):
            return cls(end=committed)  # a plain offset, e.g. reset with Kafka's tools
        try:
            head, *ranges = metadata.removeprefix(METADATA_PREFIX).split(".")
            ledger = cls(end=committed + int(head, 36))
            pointer = committed
            for token in ranges:
                gap, _, length = token.partition("+")
                a = pointer + int(gap, 36)
                pointer = a + (int(length, 36) if length else 0)
                ledger.skipped.append([a, pointer])
        except ValueError:
            return cls(end=committed)
        return ledger

    def _index(self, offset: int) -> int | None:
        i = bisect.bisect_right(self.skipped, offset, key=lambda r: r[0]) - 1
        if i >= 0 and self.skipped[i][0] <= offset <= self.skipped[i][1]:
            return i
        return None

    def _remove(self, offset: int) -> None:
        i = self._index(offset)
        if i is None:
            return
        a, b = self.skipped[i]
        parts = [[a, offset - 1]] if a < offset else []
        if offset < b:
            parts.append([offset + 1, b])
        self.skipped[i : i + 1] = parts


def _encode(end: int, skipped: list[list[int]]) -> str:
    """``end`` and the ranges, each relative to the one before, in base 36: a range is its
    gap, plus ``+length`` unless it holds one offset (``redrive/1:k.3.0+5.2``)."""
    committed = skipped[0][0] if skipped else end
    tokens = [_b36(end - committed)]
    pointer = committed
    for a, b in skipped:
        tokens.append(_b36(a - pointer) + (f"+{_b36(b - a)}" if b > a else ""))
        pointer = b
    return METADATA_PREFIX + ".".join(tokens)
