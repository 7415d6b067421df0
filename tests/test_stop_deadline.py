"""connector.app.StopDeadline: the shutdown's time line within delivery.drain_timeout_s."""

from __future__ import annotations

import time

from connector.app import StopDeadline


def test_every_step_ends_before_the_drain_timeout() -> None:
    for drain_s in (1.0, 8.0, 70.0):
        d = StopDeadline(drain_s)
        assert 0 < d.calls_until < d.commit_until < d.cancel_at < d.total == drain_s


def test_the_reserve_is_at_most_two_seconds() -> None:
    d = StopDeadline(70.0)
    assert (d.calls_until, d.commit_until, d.cancel_at) == (66.0, 68.0, 69.0)


def test_time_left_counts_from_the_first_start() -> None:
    d = StopDeadline(10.0)
    assert 9.9 < d.left() <= 10.0  # not started: a whole drain ahead
    d.start()
    first = d.left()
    time.sleep(0.05)
    d.start()  # a second start keeps the first time
    assert d.left() < first
    assert d.left(0.0) == 0.0
