"""Input partitions that cannot progress, named where an operator looks.

Two ways a partition stops while everything else says healthy (idle commit cycles succeed,
the process is up):

- **stopped**: its position was out of range (records deleted past it by retention or
  delete-records) and ``kafka.offset_out_of_range`` is ``stop``: the partition is paused
  until an operator decides (``connector.resets``);
- **blocked**: records exist beyond its position that a ``read_committed`` consumer cannot
  read: its position has reached the last stable offset (LSO) and the high watermark is
  past it, i.e. an upstream transaction is open (a producer that crashed mid-transaction
  holds it until its ``transaction.timeout.ms``). Ordinary lag is not blocking: there the
  position is below the LSO and fetching goes on.

Both are per-partition gauges; a partition blocked for ``kafka.blocked_partition_after_s``
or stopped turns readiness red with its name (``summary``; a plain attribute, read from the
health server's thread). Time comes from an injectable clock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from connector.events import TopicPartitionKey
from connector.metrics import Metrics

log = logging.getLogger(__name__)
NAMED_MAX = 5  # partitions named in the readiness line; the rest counted


def _name(tp: TopicPartitionKey) -> str:
    return f"{tp[0]}/{tp[1]}"


class PartitionProgress:
    """Stopped and blocked partitions of this replica's assignment."""

    def __init__(
        self,
        metrics: Metrics,
        blocked_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._m = metrics
        self._after_s = blocked_after_s
        self._clock = clock
        self._stopped: dict[TopicPartitionKey, str] = {}
        self._blocked_since: dict[TopicPartitionKey, tuple[float, int]] = {}  # since, LSO
        self._reported: set[TopicPartitionKey] = set()  # blocked past the time, logged
        # revoked while blocked: (since, LSO, reported). Back here at the same LSO, it has
        # been blocked all along: rebalances more often than ``blocked_after_s`` (a rolling
        # restart, an autoscaler) must not start its time again each time
        self._parked: dict[TopicPartitionKey, tuple[float, int, bool]] = {}
        self.summary: str | None = None  # why readiness is red, or None

    def is_stopped(self, tp: TopicPartitionKey) -> bool:
        return tp in self._stopped

    def stop(self, tp: TopicPartitionKey, why: str) -> None:
        """``tp`` is paused for an operator to decide (readiness names it)."""
        self._stopped[tp] = why
        self._m.partition_stopped.labels(tp[0], str(tp[1])).set(1)
        self._summarise()

    def observe(
        self, tp: TopicPartitionKey, position: int | None, lso: int | None, high: int | None
    ) -> float:
        """The consumer's position, last stable offset and high watermark of ``tp`` as last
        fetched; returns the seconds it has been blocked (0: it is not). ``position`` None
        with records beyond the LSO: not known now (figures too old, a recovery under way),
        so the last verdict holds. A partition paused by backpressure is no sign either
        way: it must not start the time again, or a backlog elsewhere hides it for ever."""
        now = self._clock()
        parked = self._parked.get(tp)
        if lso is None or high is None:
            blocked = False  # not fetched yet (a parked time waits for its figures)
        elif high <= lso:
            blocked = False
            self._parked.pop(tp, None)
        elif position is None:
            seen = self._blocked_since.get(tp) or (parked[:2] if parked else None)
            blocked = seen is not None and seen[1] == lso
        else:
            blocked = position >= lso
            if not blocked:
                self._parked.pop(tp, None)
        seconds = 0.0
        if blocked and lso is not None and high is not None:
            parked = self._parked.pop(tp, None)
            if parked is not None and parked[1] == lso and tp not in self._blocked_since:
                self._blocked_since[tp] = parked[:2]
                if parked[2]:
                    self._reported.add(tp)  # said once already: not again
            since, seen_lso = self._blocked_since.get(tp, (now, lso))
            if seen_lso != lso:
                since = now  # the LSO moved: it progressed, and is blocked again
            self._blocked_since[tp] = (since, lso)
            seconds = now - since
            if seconds >= self._after_s and tp not in self._reported:
                self._reported.add(tp)
                log.warning(
                    "partition %s cannot progress for %.0fs: its position %s is at the last "
                    "stable offset and %d record(s) beyond it cannot be read (an upstream "
                    "transaction left open?)",
                    _name(tp), seconds, position, high - lso,
                )  # fmt: skip
        elif self._blocked_since.pop(tp, None) is not None and tp in self._reported:
            self._reported.discard(tp)
            log.info("partition %s progresses again", _name(tp))
        labels = (tp[0], str(tp[1]))
        self._m.partition_blocked.labels(*labels).set(seconds)
        # the partition's series exist from the start, at 0 (see connector.metrics)
        self._m.partition_stopped.labels(*labels).set(1 if tp in self._stopped else 0)
        self._m.offsets_skipped.labels(*labels)
        self._summarise()
        return seconds

    def partitions(self) -> list[TopicPartitionKey]:
        return sorted(set(self._stopped) | set(self._blocked_since))

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Revoked: another replica (or the next session) takes them."""
        for tp in tps:
            self._stopped.pop(tp, None)
            blocked = self._blocked_since.pop(tp, None)
            if blocked is not None:
                self._parked[tp] = (*blocked, tp in self._reported)
            self._reported.discard(tp)
            for gauge in (self._m.partition_stopped, self._m.partition_blocked):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp[0], str(tp[1]))
        self._summarise()

    def _summarise(self) -> None:
        parts = []
        if self._stopped:
            names = sorted(self._stopped)
            listed = "; ".join(f"{_name(tp)} ({self._stopped[tp]})" for tp in names[:NAMED_MAX])
            more = f" and {len(names) - NAMED_MAX} more" if len(names) > NAMED_MAX else ""
            parts.append(f"partition(s) stopped for an operator: {listed}{more}")
        blocked = sorted(self._reported)
        if blocked:
            listed = ", ".join(_name(tp) for tp in blocked[:NAMED_MAX])
            more = f" and {len(blocked) - NAMED_MAX} more" if len(blocked) > NAMED_MAX else ""
            parts.append(
                f"partition(s) blocked for over {self._after_s:g}s at the last stable offset "
                f"(an open upstream transaction): {listed}{more}"
            )
        self.summary = "; ".join(parts) or None
