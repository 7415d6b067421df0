"""connector.ratelimit: token bucket, AIMD factor and group share, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from connector.ratelimit import AdaptiveRate, TokenBucket, group_share


class FakeClock:
    """A clock that only moves when someone sleeps on it.

    Like a real sleep, every sleep lets a little time pass: a float clock that did not move
    for a tiny residual wait would leave the bucket's acquire loop spinning.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 1e-9)
        await asyncio.sleep(0)


class LateClock(FakeClock):
    """Every sleep oversleeps by up to ``late_s``, as timers on a busy event loop do."""

    def __init__(self, late_s: float, seed: int = 7) -> None:
        super().__init__()
        self._late = late_s
        self._random = random.Random(seed)

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self._random.uniform(0, self._late))


def bucket(
    rate: float,
    burst: float,
    clock: FakeClock,
    adaptive: AdaptiveRate | None = None,
    window_s: float = 1.0,
) -> TokenBucket:
    return TokenBucket(
        rate, burst, clock=clock, sleep=clock.sleep, adaptive=adaptive, window_s=window_s
    )


def busiest(times: list[float], window_s: float = 1.0) -> int:
    """The most calls in any window [t, t + window_s)."""
    return max(sum(1 for u in times if t <= u < t + window_s) for t in times)


async def acquire_times(b: TokenBucket, clock: FakeClock, count: int) -> list[float]:
    times = []
    for _ in range(count):
        await b.acquire()
        times.append(clock.now)
    return times


def adaptive(clock: FakeClock, **kw: float) -> AdaptiveRate:
    params = {"decrease_factor": 0.5, "increase_per_s": 0.05, "min_fraction": 0.1} | kw
    return AdaptiveRate(clock=clock, **params)


# -- TokenBucket ---------------------------------------------------------------------------


def test_starts_empty() -> None:
    clock = FakeClock()
    b = bucket(4.0, 10, clock)
    assert b.tokens() == 0
    assert b.try_acquire() == pytest.approx(0.25)


async def test_rate_is_respected_over_many_acquisitions() -> None:
    clock = FakeClock()
    b = bucket(5.0, 1, clock)
    start = clock.now

    waited = [await b.acquire() for _ in range(50)]

    assert clock.now - start == pytest.approx(10.0)
    assert sum(waited) == pytest.approx(10.0)
    assert b.waited_s == pytest.approx(10.0)
    assert all(w == pytest.approx(0.2) for w in waited)


async def test_burst_is_capped() -> None:
    clock = FakeClock()
    b = bucket(10.0, 5, clock)
    clock.now += 100  # idle for long: still only `burst` tokens

    assert b.tokens() == pytest.approx(5)
    assert [await b.acquire() for _ in range(5)] == [0.0] * 5
    assert await b.acquire() == pytest.approx(0.1)


async def test_concurrent_acquirers_share_the_rate() -> None:
    clock = FakeClock()
    b = bucket(2.0, 1, clock)
    start = clock.now

    await asyncio.gather(*(b.acquire() for _ in range(8)))

    assert clock.now - start == pytest.approx(4.0)


async def test_pause_for_delays_the_next_token() -> None:
    clock = FakeClock()
    b = bucket(100.0, 10, clock)
    clock.now += 1  # bucket full
    b.pause_for(3.0)
    b.pause_for(1.0)  # a shorter pause does not shorten the longer one

    assert b.try_acquire() == pytest.approx(3.0)
    assert await b.acquire() == pytest.approx(3.0)
    assert await b.acquire() == 0.0  # tokens kept while paused


def test_set_rate_changes_the_refill_speed() -> None:
    clock = FakeClock()
    b = bucket(1.0, 100, clock)
    clock.now += 2
    b.set_rate(10.0)  # tokens earned so far are kept at the old rate
    assert b.tokens() == pytest.approx(2)
    clock.now += 1
    assert b.tokens() == pytest.approx(12)
    assert b.rate == 10.0


def test_set_rate_with_a_smaller_burst_drops_extra_tokens() -> None:
    clock = FakeClock()
    b = bucket(10.0, 20, clock)
    clock.now += 10
    assert b.tokens() == pytest.approx(20)
    b.set_rate(10.0, burst=3)
    assert b.tokens() == pytest.approx(3)


def test_zero_rate_hands_out_no_new_tokens() -> None:
    clock = FakeClock()
    b = bucket(5.0, 5, clock)
    b.set_rate(0.0)
    clock.now += 60
    assert b.tokens() == 0
    assert b.try_acquire() > 0


def test_bucket_rate_follows_the_adaptive_factor() -> None:
    clock = FakeClock()
    aimd = adaptive(clock)
    b = bucket(10.0, 1, clock, adaptive=aimd)
    assert b.rate == pytest.approx(10.0)
    aimd.on_overload()
    assert b.rate == pytest.approx(5.0)
    assert b.try_acquire() == pytest.approx(0.2)


async def test_late_timers_never_put_more_than_rate_times_window_in_a_window() -> None:
    """A third of 100/s with timers up to 5 ms late: the slack token lets the bucket catch
    up (so the average holds), and the sliding window keeps every second to 33 calls."""
    clock = LateClock(late_s=0.005)
    b = bucket(100 / 3, 1, clock)

    times = await acquire_times(b, clock, 600)

    assert busiest(times) == 33
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.98 * 33


async def test_without_the_window_late_timers_overshoot() -> None:
    """The same run with the window stretched to nothing: what the window prevents."""
    clock = LateClock(late_s=0.005)
    b = bucket(100 / 3, 1, clock, window_s=1e-6)

    times = await acquire_times(b, clock, 600)

    assert busiest(times) > 33


async def test_a_full_bucket_bursts_but_the_window_holds() -> None:
    clock = FakeClock()
    b = bucket(10.0, 10, clock)
    clock.now += 5  # idle: ten tokens

    times = await acquire_times(b, clock, 40)

    assert times[:10] == [times[0]] * 10  # the burst goes out at once
    assert busiest(times) == 10
    assert times[10] == pytest.approx(times[0] + 1.0)  # then waits for the window


async def test_calls_at_the_old_rate_count_against_a_lower_rate() -> None:
    """After a rebalance lowers the share, the last window's calls still count: the
    replica does not add its new share on top of what it just sent."""
    clock = FakeClock()
    b = bucket(50.0, 1, clock)
    before = await acquire_times(b, clock, 50)
    b.set_rate(20.0)

    after = await acquire_times(b, clock, 60)

    assert all(sum(1 for u in before + after if t - 1.0 < u <= t) <= 20 for t in after)


async def test_a_longer_window_for_a_per_minute_quota() -> None:
    clock = LateClock(late_s=0.01)
    b = bucket(2.0, 1, clock, window_s=60.0)

    times = await acquire_times(b, clock, 300)

    assert busiest(times, 60.0) == 120


# -- AdaptiveRate --------------------------------------------------------------------------


def test_multiplicative_decrease_once_per_cooldown() -> None:
    clock = FakeClock()
    aimd = adaptive(clock, increase_per_s=1e-9)
    assert aimd.factor == 1.0

    aimd.on_overload()
    assert aimd.factor == pytest.approx(0.5)
    clock.now += 0.5
    aimd.on_overload()  # same burst of 429s: no second cut
    assert aimd.factor == pytest.approx(0.5)

    clock.now += 0.6
    aimd.on_overload()
    assert aimd.factor == pytest.approx(0.25, abs=1e-6)


def test_no_recovery_during_the_cooldown() -> None:
    clock = FakeClock()
    aimd = adaptive(clock, cooldown_s=2.0)
    aimd.on_overload()
    for _ in range(3):
        clock.now += 0.5
        assert aimd.factor == pytest.approx(0.5)


def test_additive_recovery_up_to_one() -> None:
    clock = FakeClock()
    aimd = adaptive(clock, increase_per_s=0.05, cooldown_s=1.0)
    aimd.on_overload()
    clock.now += 5.0
    # 4 s past the cool-down at 0.05/s (the cool-down itself may count or not)
    assert 0.5 + 0.05 * 4 - 1e-9 <= aimd.factor <= 0.5 + 0.05 * 5 + 1e-9

    previous = aimd.factor
    for _ in range(20):
        clock.now += 1.0
        assert aimd.factor >= previous
        previous = aimd.factor
    assert aimd.factor == 1.0  # 0.5 + 0.05 * 25 > 1: capped


def test_floor() -> None:
    clock = FakeClock()
    aimd = adaptive(clock, min_fraction=0.2, increase_per_s=1e-9, cooldown_s=1.0)
    for _ in range(10):
        aimd.on_overload()
        clock.now += 1.0
    assert aimd.factor == pytest.approx(0.2)


# -- group_share ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owned", "total", "expected"),
    [(6, 6, 20.0), (3, 6, 10.0), (1, 6, 20 / 6), (0, 6, 0.0), (4, 0, 0.0), (8, 6, 20.0)],
)
def test_group_share(owned: int, total: int, expected: float) -> None:
    assert group_share(20.0, owned, total) == pytest.approx(expected)


def test_shares_of_a_split_assignment_add_up_to_the_global_rate() -> None:
    assignment = [3, 2, 1, 1, 0]  # partitions per replica, 7 in all
    assert sum(group_share(35.0, n, 7) for n in assignment) == pytest.approx(35.0)


async def test_take_now_takes_a_free_token_and_never_jumps_a_waiting_caller() -> None:
    """The per-event fast path (no lock, no coroutine) takes a token only when one is free
    and nobody is inside ``acquire``: a caller waiting for the next token keeps its turn,
    and the fast path counts against the same rate and window."""
    clock = FakeClock()
    b = bucket(2.0, 1, clock)
    clock.now += 1  # one token accrued
    assert b.take_now()  # free and nobody waits
    assert not b.take_now()  # empty: the caller must acquire
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0)  # inside acquire, sleeping for its token
    clock.now += 10  # tokens accrue while it sleeps
    assert not b.take_now()  # ... but they are not the fast path's while it waits
    assert await waiter > 0
    assert b.take_now()  # nobody waits any more
    times = [clock.now]
    for _ in range(5):  # the fast path and acquire together keep the rate
        if not b.take_now():
            await b.acquire()
        times.append(clock.now)
    assert busiest(times) <= 2
