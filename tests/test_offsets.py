"""connector.offsets: contiguous commit positions from out-of-order completions."""

from __future__ import annotations

import pytest

from connector.offsets import OffsetTracker

TP = ("orders", 0)
TP2 = ("orders", 1)


def tracker_with(tp: tuple[str, int], offsets: list[int]) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.add(tp, offset)
    return tracker


def test_nothing_to_commit_before_anything_is_done() -> None:
    tracker = tracker_with(TP, [0, 1, 2])
    assert tracker.uncommitted() == {}
    assert tracker.pending(TP) == 3


def test_in_order_completion() -> None:
    tracker = tracker_with(TP, [0, 1, 2])
    tracker.done(TP, 0)
    assert tracker.uncommitted() == {TP: 1}
    tracker.done(TP, 1)
    tracker.done(TP, 2)
    assert tracker.uncommitted() == {TP: 3}
    assert tracker.pending(TP) == 0


def test_out_of_order_completion_commits_only_the_contiguous_prefix() -> None:
    tracker = tracker_with(TP, [0, 1, 2, 3, 4])

    tracker.done(TP, 3)
    tracker.done(TP, 1)
    assert tracker.uncommitted() == {}
    assert tracker.lag_behind_fetch(TP) == 2

    tracker.done(TP, 0)
    assert tracker.uncommitted() == {TP: 2}  # 2 is still running
    assert tracker.lag_behind_fetch(TP) == 1

    tracker.done(TP, 2)
    assert tracker.uncommitted() == {TP: 4}
    assert tracker.lag_behind_fetch(TP) == 0
    assert tracker.pending(TP) == 1


def test_gaps_in_offsets() -> None:
    """Compaction and transaction markers leave holes: only fetched offsets count."""
    tracker = tracker_with(TP, [10, 12, 15])

    tracker.done(TP, 12)
    assert tracker.uncommitted() == {}
    tracker.done(TP, 10)
    assert tracker.uncommitted() == {TP: 13}
    tracker.done(TP, 15)
    assert tracker.uncommitted() == {TP: 16}


def test_done_for_an_offset_never_fetched_does_not_move_the_position() -> None:
    tracker = tracker_with(TP, [5, 6])
    tracker.done(TP, 6)
    tracker.done(TP, 4)
    assert tracker.uncommitted() == {}


def test_partitions_are_independent() -> None:
    tracker = tracker_with(TP, [0, 1])
    tracker.add(TP2, 100)
    tracker.add(TP2, 101)

    tracker.done(TP2, 100)
    tracker.done(TP, 1)
    assert tracker.uncommitted() == {TP2: 101}
    assert tracker.pending() == 3
    assert sorted(tracker.partitions()) == [TP, TP2]


def test_mark_committed_clears_until_the_position_moves_again() -> None:
    tracker = tracker_with(TP, [0, 1, 2])
    tracker.add(TP2, 7)
    tracker.done(TP, 0)
    tracker.done(TP2, 7)

    positions = tracker.uncommitted()
    assert positions == {TP: 1, TP2: 8}
    tracker.mark_committed(positions)
    assert tracker.uncommitted() == {}

    tracker.done(TP, 1)
    assert tracker.uncommitted() == {TP: 2}


def test_mark_committed_of_an_older_snapshot_leaves_the_newer_position() -> None:
    tracker = tracker_with(TP, [0, 1])
    tracker.done(TP, 0)
    snapshot = tracker.uncommitted()
    tracker.done(TP, 1)  # finished while the commit was under way

    tracker.mark_committed(snapshot)
    assert tracker.uncommitted() == {TP: 2}


def test_committed_position() -> None:
    tracker = tracker_with(TP, [40, 41])
    assert tracker.committed_position(TP) == 40  # nothing committed yet: first fetched
    assert tracker.committed_position(TP2) is None

    tracker.done(TP, 40)
    tracker.mark_committed(tracker.uncommitted())
    assert tracker.committed_position(TP) == 41


def test_mark_committed_of_an_unknown_partition_is_ignored() -> None:
    tracker = OffsetTracker()
    tracker.mark_committed({TP: 5})
    assert tracker.partitions() == []
    assert tracker.uncommitted() == {}


def test_drop_forgets_a_revoked_partition() -> None:
    tracker = tracker_with(TP, [0, 1])
    tracker.add(TP2, 0)
    tracker.done(TP, 0)

    tracker.drop(TP)
    tracker.done(TP, 1)  # a late completion after revocation is ignored

    assert tracker.uncommitted() == {}
    assert tracker.pending(TP) == 0
    assert tracker.partitions() == [TP2]
    assert tracker.committed_position(TP) is None

    tracker.add(TP, 0)  # reassigned later: starts afresh from the committed offset
    tracker.done(TP, 0)
    assert tracker.uncommitted() == {TP: 1}


@pytest.mark.parametrize("offset", [5, 4])
def test_add_must_increase(offset: int) -> None:
    tracker = tracker_with(TP, [3, 5])
    with pytest.raises(ValueError, match="not after"):
        tracker.add(TP, offset)
    tracker.add(TP2, offset)  # another partition is unaffected


def test_add_must_increase_after_everything_is_done() -> None:
    tracker = tracker_with(TP, [5])
    tracker.done(TP, 5)
    with pytest.raises(ValueError, match="not after"):
        tracker.add(TP, 3)


def test_skip_to_moves_an_idle_partition_past_markers() -> None:
    tracker = tracker_with(TP, [0, 1, 2])
    for offset in (0, 1, 2):
        tracker.done(TP, offset)
    tracker.mark_committed(tracker.uncommitted())
    assert tracker.skip_to(TP, 4, committed=None)  # a commit marker at offset 3
    assert tracker.uncommitted() == {TP: 4}
    tracker.add(TP, 4)  # the next record follows the marker
    assert not tracker.skip_to(TP, 5, committed=None)  # busy: its completion moves it
    tracker.done(TP, 4)
    assert tracker.uncommitted() == {TP: 5}


def test_skip_to_never_moves_backwards_and_learns_the_committed_offset() -> None:
    tracker = OffsetTracker()
    assert not tracker.skip_to(TP, 7, committed=7)  # a partition new to this session
    assert tracker.uncommitted() == {}
    assert tracker.skip_to(TP2, 8, committed=7)
    assert tracker.uncommitted() == {TP2: 8}
    assert not tracker.skip_to(TP2, 6, committed=7)
