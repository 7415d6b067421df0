"""connector.dedup: the window, in-flight collapsing, and the changelog-backed store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import orjson
import pytest

from connector.dedup import (
    ChangelogDedupStore,
    DedupWindow,
    InFlight,
    MemoryDedupStore,
    Seen,
    changelog_topic,
)

Entry = tuple[bytes | None, bytes | None]  # key, value in a changelog partition
TP = ("orders", 0)
TP2 = ("orders", 1)
OTHER = ("invoices", 0)
TTL = 100.0


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def seen(event_id: str, at: float, thread: str | None = None) -> Seen:
    return Seen(event_id=event_id, seen_at=at, thread_uid=thread or f"th-{event_id}")


# -- DedupWindow ---------------------------------------------------------------------------


def test_window_remembers_per_partition() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 10, clock)
    window.add(TP, seen("e-1", clock.now))

    assert window.get(TP, "e-1") == clock.now
    assert window.get(TP2, "e-1") is None
    assert window.get(TP, "e-2") is None
    assert len(window) == 1


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 10, clock)
    window.add(TP, seen("e-1", clock.now))

    clock.now += TTL - 1
    assert window.get(TP, "e-1") is not None

    clock.now += 2
    assert window.get(TP, "e-1") is None
    assert window.expired == 1
    assert window.evicted == 0
    assert len(window) == 0


def test_expired_entries_are_trimmed_when_adding() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 10, clock)
    window.add(TP, seen("old-1", clock.now))
    window.add(TP, seen("old-2", clock.now))
    clock.now += TTL + 1

    window.add(TP, seen("new", clock.now))

    assert len(window) == 1
    assert window.expired == 2
    assert window.evicted == 0


def test_max_entries_evicts_the_oldest_and_counts_them() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 3, clock)
    for i in range(5):
        window.add(TP, seen(f"e-{i}", clock.now))
        clock.now += 1

    assert len(window) == 3
    assert window.evicted == 2
    assert window.expired == 0
    assert window.get(TP, "e-0") is None
    assert window.get(TP, "e-1") is None
    assert all(window.get(TP, f"e-{i}") is not None for i in (2, 3, 4))


def test_adding_again_makes_an_entry_the_newest() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 3, clock)
    for name in ("a", "b", "c"):
        window.add(TP, seen(name, clock.now))
    window.add(TP, seen("a", clock.now))
    window.add(TP, seen("d", clock.now))

    assert window.get(TP, "a") is not None
    assert window.get(TP, "b") is None
    assert window.evicted == 1


def test_drop_forgets_only_the_given_partitions() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 10, clock)
    window.add(TP, seen("e-1", clock.now))
    window.add(TP2, seen("e-1", clock.now))
    window.add(OTHER, seen("e-2", clock.now))

    window.drop([TP, OTHER])

    assert window.get(TP, "e-1") is None
    assert window.get(OTHER, "e-2") is None
    assert window.get(TP2, "e-1") is not None
    assert window.evicted == 0


def test_discard() -> None:
    clock = FakeClock()
    window = DedupWindow(TTL, 10, clock)
    window.add(TP, seen("e-1", clock.now))
    window.discard(TP, "e-1")
    window.discard(TP, "never-added")
    assert window.get(TP, "e-1") is None


def test_seen_round_trips_through_its_encoding() -> None:
    original = seen("e-1", 1_700_000_000.25, "th-77")
    assert Seen.decode("e-1", original.encode()) == original


# -- InFlight ------------------------------------------------------------------------------


async def test_in_flight_claim_and_release() -> None:
    inflight = InFlight()
    assert inflight.claim(TP, "e-1") is None  # the first copy owns the call
    waiter = inflight.claim(TP, "e-1")
    assert waiter is not None
    assert not waiter.done()
    assert inflight.claim(TP2, "e-1") is None  # another partition: another key
    assert len(inflight) == 2

    inflight.release(TP, "e-1")

    assert waiter.done()
    assert len(inflight) == 1
    assert inflight.claim(TP, "e-1") is None  # after release, a new call may start
    inflight.release(TP, "e-1")
    inflight.release(TP2, "e-1")
    inflight.release(TP, "unknown")
    assert len(inflight) == 0


async def test_in_flight_waiter_wakes_when_released() -> None:
    inflight = InFlight()
    inflight.claim(TP, "e-1")
    waiter = inflight.claim(TP, "e-1")
    assert waiter is not None
    task = asyncio.ensure_future(waiter)
    await asyncio.sleep(0)
    assert not task.done()

    inflight.release(TP, "e-1")
    await asyncio.wait_for(task, timeout=1)


# -- stores --------------------------------------------------------------------------------


async def test_memory_store() -> None:
    clock = FakeClock()
    store = MemoryDedupStore(DedupWindow(TTL, 10, clock))
    assert await store.restore([TP]) == 0
    assert store.remember(TP, seen("e-1", clock.now)) is None
    assert store.seen(TP, "e-1") is not None
    store.forget([TP])
    assert store.seen(TP, "e-1") is None


def test_changelog_topic_name() -> None:
    assert changelog_topic("grp", "orders", "dedup-changelog") == "grp-orders-dedup-changelog"


def make_store(
    clock: FakeClock, log: dict[tuple[str, int], list[Entry]]
) -> tuple[ChangelogDedupStore, list[tuple[str, int]]]:
    reads: list[tuple[str, int]] = []

    async def reader(
        partitions: Sequence[tuple[str, int]],
    ) -> AsyncGenerator[tuple[tuple[str, int], bytes | None, bytes | None], None]:
        """Like TopicReader: every partition at once, entries of different partitions
        interleaved, each partition's in order."""
        reads.extend(partitions)
        queues = [(tp, list(log.get(tp, []))) for tp in partitions]
        while any(entries for _, entries in queues):
            for tp, entries in queues:
                if entries:
                    await asyncio.sleep(0)
                    key, value = entries.pop(0)
                    yield tp, key, value

    store = ChangelogDedupStore(
        DedupWindow(TTL, 1_000, clock),
        lambda topic: changelog_topic("grp", topic, "dedup-changelog"),
        reader,
    )
    return store, reads


def test_remember_returns_the_changelog_record() -> None:
    clock = FakeClock()
    store, _ = make_store(clock, {})
    entry = seen("e-9", clock.now, "th-9")

    out = store.remember(("orders", 4), entry)

    assert out is not None
    assert out.topic == "grp-orders-dedup-changelog"
    assert out.partition == 4
    assert out.key == b"e-9"
    assert out.value is not None
    assert Seen.decode("e-9", out.value) == entry
    assert store.seen(("orders", 4), "e-9") == entry.seen_at


async def test_restore_rebuilds_the_window_from_the_changelog() -> None:
    clock = FakeClock()
    writer, _ = make_store(clock, {})
    record_a = writer.remember(TP, seen("a", clock.now - 10, "th-a"))
    record_b = writer.remember(TP, seen("b", clock.now - 5, "th-b"))
    record_c = writer.remember(TP2, seen("c", clock.now, "th-c"))
    assert record_a and record_b and record_c
    changelog = "grp-orders-dedup-changelog"
    log: dict[tuple[str, int], list[Entry]] = {
        (changelog, 0): [
            (record_a.key, record_a.value),
            (record_b.key, record_b.value),
            (b"a", None),  # tombstone: forget "a"
            (None, b"ignored: no key"),
        ],
        (changelog, 1): [(record_c.key, record_c.value)],
    }
    store, reads = make_store(clock, log)

    await store.restore([TP, TP2])

    assert sorted(reads) == [(changelog, 0), (changelog, 1)]
    assert store.seen(TP, "a") is None
    assert store.seen(TP, "b") is not None
    assert store.seen(TP2, "c") is not None
    assert store.seen(TP, "c") is None  # entries stay in their own partition
    assert len(store.window) == 2


async def test_restore_counts_entries_and_tombstones_remove_known_ids() -> None:
    clock = FakeClock()
    changelog = "grp-orders-dedup-changelog"
    log: dict[tuple[str, int], list[Entry]] = {
        (changelog, 0): [(b"x", Seen("x", clock.now, "th-x").encode()), (b"old", None)],
    }
    store, _ = make_store(clock, log)
    store.window.add(TP, seen("old", clock.now))

    assert await store.restore([TP]) == 1
    assert store.seen(TP, "old") is None
    assert store.seen(TP, "x") is not None


async def test_restored_entries_older_than_the_ttl_are_not_duplicates() -> None:
    clock = FakeClock()
    changelog = "grp-orders-dedup-changelog"
    stale = Seen("stale", clock.now - TTL - 1, "th-s").encode()
    live = Seen("live", clock.now - TTL + 1, "th-l").encode()
    store, _ = make_store(clock, {(changelog, 0): [(b"stale", stale), (b"live", live)]})

    assert await store.restore([TP]) == 1  # the stale entry is neither counted nor kept

    assert store.seen(TP, "stale") is None
    assert store.seen(TP, "live") is not None
    assert len(store.window) == 1


@pytest.mark.parametrize("tps", [[], [("orders", 7)]])
async def test_restore_of_an_empty_changelog(tps: list[tuple[str, int]]) -> None:
    store, reads = make_store(FakeClock(), {})
    assert await store.restore(tps) == 0
    assert len(reads) == len(tps)
    assert len(store.window) == 0


# -- typed ids and dead-letter marks -------------------------------------------------------


async def test_entries_of_the_old_code_are_read_by_their_raw_string_key() -> None:
    """Old entries (no version) are keyed by the raw string; "5" stood for both 5 and "5"."""
    clock = FakeClock()
    changelog = "grp-orders-dedup-changelog"
    old_value = orjson.dumps({"t": clock.now, "threadUid": "th"})
    new = Seen('"n"', clock.now, "th-n").encode()
    log: dict[tuple[str, int], list[Entry]] = {
        (changelog, 0): [(b"abc", old_value), (b"5", old_value), (b'"n"', new), (b"7", new)],
    }
    store, _ = make_store(clock, log)
    await store.restore([TP])
    assert store.seen(TP, '"abc"') is not None
    assert store.seen(TP, "abc") is None
    assert store.seen(TP, '"5"') is not None and store.seen(TP, "5") is not None
    assert store.seen(TP, '"n"') is not None
    assert store.seen(TP, "7") is not None and store.seen(TP, '"7"') is None


async def test_dead_letter_marks_round_trip_and_are_tombstoned_once_committed() -> None:
    clock = FakeClock()
    writer, _ = make_store(clock, {})
    marks = [writer.remember_dead_letter(TP, offset) for offset in (3, 7, 12)]
    assert all(m is not None and m.partition == 0 for m in marks)
    assert writer.dead_lettered(TP, 7) and not writer.dead_lettered(TP, 8)
    assert not writer.dead_lettered(TP2, 7)

    writer.prune({TP: 8})  # committed position passed 3 and 7
    assert not writer.dead_lettered(TP, 3) and writer.dead_lettered(TP, 12)
    tombstones = writer.take_tombstones()
    assert [(t.key, t.value) for t in tombstones] == [(m.key, None) for m in marks[:2] if m]
    assert writer.take_tombstones() == []

    changelog = "grp-orders-dedup-changelog"
    entries: list[Entry] = [(m.key, m.value) for m in marks if m]
    entries += [(t.key, t.value) for t in tombstones]
    store, _ = make_store(clock, {(changelog, 0): entries})
    await store.restore([TP])
    assert [o for o in range(20) if store.dead_lettered(TP, o)] == [12]
    assert len(store.window) == 0  # marks are not event ids
    store.forget([TP])
    assert not store.dead_lettered(TP, 12)


async def test_entries_it_cannot_read_are_skipped_not_a_failed_restore() -> None:
    """A changelog entry the connector did not write (by hand, another tool, corrupted)
    raised out of the restore: every restore of the partition failed and the replica
    restarted its session for ever. Now it is skipped and the rest is restored."""
    clock = FakeClock()
    changelog = "grp-orders-dedup-changelog"
    good = Seen('"ok"', clock.now, "th-ok").encode()
    log: dict[tuple[str, int], list[Entry]] = {
        (changelog, 0): [
            (b"\xffdl:abc", b"{}"),  # a dead-letter mark whose offset is no number
            (b'"x"', b"not json"),
            (b'"y"', b"[1, 2]"),  # JSON, not an object
            (b'"z"', orjson.dumps({"v": 2})),  # no time, no thread
            (b'"ok"', good),
        ],
    }
    store, _ = make_store(clock, log)

    assert await store.restore([TP]) == 1
    assert store.seen(TP, '"ok"') is not None
    assert len(store.window) == 1
