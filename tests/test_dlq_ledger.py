"""connector.dlq.ledger: the redrive position, and the records a filter left behind."""

from __future__ import annotations

import random

from connector.dlq.ledger import METADATA_PREFIX, PartitionLedger


def run(ledger: PartitionLedger, offsets: list[int], copy: set[int]) -> None:
    for offset in offsets:
        ledger.record(offset, copied=offset in copy)


def test_fresh_ledger_everything_pending() -> None:
    ledger = PartitionLedger()
    assert ledger.pending(0) and ledger.pending(10**9)
    assert ledger.committed == 0


def test_all_copied_moves_the_position_past_them() -> None:
    ledger = PartitionLedger()
    run(ledger, [0, 1, 2, 4, 6], copy={0, 1, 2, 4, 6})  # 3 and 5: transaction markers
    assert (ledger.committed, ledger.end, ledger.skipped) == (7, 7, [])
    assert not any(ledger.pending(o) for o in range(7)) and ledger.pending(7)


def test_left_records_stay_pending_and_hold_the_committed_offset() -> None:
    ledger = PartitionLedger()
    run(ledger, [0, 1, 2, 4, 5, 7, 9], copy={0, 2, 9})
    # 4, 5 and 7 are consecutive records (6, 8: markers): one range
    assert ledger.skipped == [[1, 1], [4, 7]]
    assert ledger.committed == 1 and ledger.end == 10
    assert [o for o in range(10) if ledger.pending(o)] == [1, 4, 5, 6, 7]


def test_a_later_run_copies_a_left_record_and_keeps_the_rest() -> None:
    ledger = PartitionLedger()
    run(ledger, [0, 1, 2, 3], copy={0})
    assert ledger.skipped == [[1, 3]]
    ledger = PartitionLedger.decode(ledger.committed, ledger.metadata())
    run(ledger, [1, 2, 3, 4, 5], copy={2, 5})
    assert ledger.skipped == [[1, 1], [3, 4]]
    assert ledger.end == 6


def test_done_records_stay_done_when_read_again() -> None:
    ledger = PartitionLedger()
    run(ledger, [0, 1, 2], copy={0, 2})
    ledger = PartitionLedger.decode(ledger.committed, ledger.metadata())
    run(ledger, [1, 2, 3], copy=set())  # 2 was copied: reading it again leaves it done
    assert ledger.skipped == [[1, 1], [3, 3]]
    assert not ledger.pending(2)


def test_metadata_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(200):
        ledger = PartitionLedger()
        offsets = sorted(rng.sample(range(5000), 300))
        run(ledger, offsets, copy={o for o in offsets if rng.random() < 0.6})
        text = ledger.metadata()
        assert text.startswith(METADATA_PREFIX)
        back = PartitionLedger.decode(ledger.committed, text)
        assert (back.end, back.skipped) == (ledger.end, ledger.skipped)


def test_plain_offset_means_everything_below_is_done() -> None:
    assert PartitionLedger.decode(42, "").pending(41) is False
    assert PartitionLedger.decode(42, "").pending(42) is True
    assert PartitionLedger.decode(-1, "").end == 0
    assert PartitionLedger.decode(42, METADATA_PREFIX + "not!base36").end == 42


def test_fit_forgets_the_oldest_ranges() -> None:
    ledger = PartitionLedger()
    offsets = list(range(4000))
    run(ledger, offsets, copy={o for o in offsets if o % 2})  # every other one left
    before = [list(r) for r in ledger.skipped]
    given_up = ledger.fit(budget=200)
    assert len(ledger.metadata()) <= 200
    kept = len(ledger.skipped)  # as few dropped as the budget allows
    assert len(PartitionLedger(ledger.end, before[-kept - 1 :]).metadata()) > 200
    assert given_up > 0 and ledger.skipped[-1] == [3998, 3998]
    assert not ledger.pending(0)  # passed: --again reaches it


def test_prune_below_the_log_start() -> None:
    ledger = PartitionLedger(end=100, skipped=[[5, 9], [20, 30], [50, 50]])
    ledger.prune_below(25)
    assert ledger.skipped == [[25, 30], [50, 50]]
