"""connector.progress: blocked means "cannot read what exists", never ordinary lag."""

from __future__ import annotations

from connector.metrics import Metrics
from connector.progress import PartitionProgress

TP = ("in", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[PartitionProgress, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    return PartitionProgress(metrics, 30, clock), clock, metrics


def test_ordinary_lag_is_not_blocking() -> None:
    progress, clock, metrics = make()
    for _ in range(10):
        clock.now += 60
        # far behind, and an upstream transaction open further on: still readable records
        assert progress.observe(TP, position=10, lso=5_000, high=5_100) == 0
    assert progress.summary is None
    assert metrics.partition_blocked.labels("in", "0")._value.get() == 0


def test_blocked_past_the_time_is_named_and_clears() -> None:
    progress, clock, metrics = make()
    assert progress.observe(TP, position=50, lso=50, high=61) == 0
    clock.now += 29
    assert progress.observe(TP, position=50, lso=50, high=61) == 29
    assert progress.summary is None  # not yet: an ordinary transaction may take this long
    clock.now += 2
    assert progress.observe(TP, position=50, lso=50, high=61) == 31
    assert progress.summary is not None and "in/0" in progress.summary
    assert metrics.partition_blocked.labels("in", "0")._value.get() == 31
    clock.now += 1
    assert progress.observe(TP, position=50, lso=61, high=61) == 0  # the transaction ended
    assert progress.summary is None


def test_a_moving_last_stable_offset_starts_the_time_again() -> None:
    progress, clock, _ = make()
    lso = 50
    for _ in range(10):  # a busy transactional producer: the LSO trails, and moves
        clock.now += 20
        lso += 7
        assert progress.observe(TP, position=lso, lso=lso, high=lso + 3) == 0
    assert progress.summary is None


def test_a_stopped_partition_is_named_until_revoked() -> None:
    progress, _, metrics = make()
    progress.stop(TP, "offset 10 out of range, the log holds 30-35")
    assert progress.is_stopped(TP)
    assert progress.summary is not None and "in/0 (offset 10 out of range" in progress.summary
    assert metrics.partition_stopped.labels("in", "0")._value.get() == 1
    progress.forget([TP])
    assert progress.summary is None and not progress.is_stopped(TP)


def test_many_partitions_are_counted_not_all_named() -> None:
    progress, _, _ = make()
    for p in range(8):
        progress.stop(("in", p), "out of range")
    assert progress.summary is not None and "and 3 more" in progress.summary


def test_an_unknown_position_holds_the_last_verdict() -> None:
    """Figures not known now (a recovery under way, a failed look-up) neither start the
    time nor start it again: a partition blocked stays blocked, one progressing stays so."""
    progress, clock, _ = make()
    assert progress.observe(TP, position=None, lso=50, high=61) == 0  # never seen blocked
    assert progress.observe(TP, position=50, lso=50, high=61) == 0
    clock.now += 20
    assert progress.observe(TP, position=None, lso=50, high=61) == 20
    clock.now += 20
    assert progress.observe(TP, position=None, lso=50, high=61) == 40
    assert progress.summary is not None and "in/0" in progress.summary
    assert progress.observe(TP, position=None, lso=61, high=61) == 0  # readable now
    assert progress.summary is None


def test_back_after_a_rebalance_at_the_same_stable_offset_it_was_blocked_all_along() -> None:
    """Rebalances more often than the time (a rolling restart) that leave the partition
    here: its time goes on, and it is said once; at another LSO it starts again."""
    progress, clock, _ = make()
    assert progress.observe(TP, position=50, lso=50, high=61) == 0
    for _ in range(4):
        clock.now += 10
        progress.forget([TP])
        assert progress.observe(TP, position=None, lso=None, high=None) == 0  # not fetched
        assert progress.observe(TP, position=50, lso=50, high=61) == clock.now - 100
    assert progress.summary is not None and "in/0" in progress.summary
    progress.forget([TP])
    assert progress.summary is None  # not ours meanwhile
    clock.now += 10
    assert progress.observe(TP, position=61, lso=61, high=70) == 0  # moved on: again
