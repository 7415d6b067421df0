"""What a redrive does with each dead letter, and the copy it writes (pure: no I/O).

The copy keeps the original record: key, value, headers (without the ``dlq-*`` ones),
partition (so it meets the dedup partition of its duplicates, whatever partitioner the
producer used) and timestamp (so a route's ``max_event_age_s`` still sees the event's
age). It gains ``dlq-redrive-count`` (one more than the dead letter carried) and
``dlq-redriven-from`` (the dead letter's own topic/partition/offset).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from connector.dlq.records import (
    NOT_REDRIVABLE_BY_DEFAULT,
    REDRIVE_COUNT_HEADER,
    REDRIVEN_FROM_HEADER,
    DeadLetter,
    Filter,
)

# what a redrive does with each dead letter it reads
COPY = "copy"
ALREADY = "already_redriven"  # an earlier redrive copied it (no --again)
FILTERED = "filtered_out"  # left by --code/--stage/--event-type/--since/... : still to do
NOT_REDRIVABLE = "not_redrivable"  # code in NOT_REDRIVABLE_BY_DEFAULT, not named by --code
NO_SOURCE = "no_source"  # no readable dlq-source header
NOT_AN_INPUT = "not_an_input_topic"  # its source topic is not in kafka.input_topics
NO_PARTITION = "no_such_partition"  # its source topic (now) lacks that partition, or is gone
MAX_REDRIVES = "max_redrives"  # redriven --max-redrives times already: it keeps failing
DEFAULT_MAX_REDRIVES = 3


@dataclass(frozen=True)
class RedriveOptions:
    filter: Filter = field(default_factory=Filter)
    dry_run: bool = False
    again: bool = False
    rate_per_s: float | None = None
    batch_size: int = 500


@dataclass(frozen=True, slots=True)
class Copy:
    """The record a redrive writes for one dead letter."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None
    dead_letter: DeadLetter


def decide(
    dl: DeadLetter,
    pending: bool,
    opts: RedriveOptions,
    inputs: frozenset[str],
    partitions: Mapping[str, int] | None = None,
) -> str:
    """What the redrive does with this dead letter (one of the outcome constants).
    ``partitions``: the input topics' partition counts; a copy to a partition they lack
    failed aiokafka's assertion ("Unrecognized partition"), a crash at the same dead letter
    at every rerun, so nothing after it was ever redriven."""
    if not pending and not opts.again:
        return ALREADY
    if not opts.filter.matches(dl):
        limit = opts.filter.max_redrives
        if (
            limit is not None
            and dl.redrive_count >= limit
            and replace(opts.filter, max_redrives=None).matches(dl)
        ):
            return MAX_REDRIVES  # wanted, but copied back this often already
        return FILTERED
    if dl.code in NOT_REDRIVABLE_BY_DEFAULT and dl.code not in opts.filter.codes:
        return NOT_REDRIVABLE
    if dl.source is None:
        return NO_SOURCE
    if dl.source.topic not in inputs:
        return NOT_AN_INPUT
    if partitions is not None and dl.source.partition >= partitions.get(dl.source.topic, 0):
        return NO_PARTITION
    return COPY


def copy_of(dl: DeadLetter) -> Copy:
    """The original record back, with the redrive's two headers."""
    if dl.source is None:
        raise ValueError("a dead letter without dlq-source cannot be copied")
    headers = (
        *dl.original_headers(),
        (REDRIVE_COUNT_HEADER, str(dl.redrive_count + 1).encode()),
        (REDRIVEN_FROM_HEADER, dl.coordinates.encode()),
    )
    stamp = dl.source_timestamp_ms if dl.source_timestamp_ms else dl.timestamp_ms
    return Copy(
        dl.source.topic,
        dl.source.partition,
        dl.key,
        dl.value,
        headers,
        stamp if stamp and stamp > 0 else None,
        dl,
    )


class Pacer:
    """At most ``rate`` copies a second, evenly spaced (injectable clock and sleep)."""

    def __init__(
        self,
        rate_per_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("the rate must be above 0")
        self._interval = 1.0 / rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        now = self._clock()
        if self._next is not None and self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._next = now + self._interval
