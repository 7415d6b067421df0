"""One consumer-group membership: the ``Session`` (issue 19).

A session is created fresh for each membership by ``Connector.run``: its consumer
(``Source``) and producer (``Sink``), the pipeline and its offsets, the dedup store, the
records held for partitions still restoring, the assignment, a rebalance hook's failure
and the generation counter all live here and go with it. A fenced producer, a refused
commit or a failed hook ends the session without committing (``FencedError``); the next
one starts from the committed offsets with nothing left over to reset by hand.

The ``Connector`` keeps what lives as long as the process: settings, metrics, the HTTP
clients (``Apps``), the health server, the dedup window's memory, and what readiness and
liveness read (the loop heartbeat, the last successful commit, Kafka problems).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from connector.dedup import ChangelogDedupStore, DedupStore, MemoryDedupStore, changelog_topic
from connector.errors import FencedError
from connector.events import InputRecord, TopicPartitionKey
from connector.kafka_common import client_kwargs
from connector.pipeline import Pipeline
from connector.sink import Sink
from connector.source import Source, TopicReader
from connector.topics import TopicManager

if TYPE_CHECKING:
    from connector.app import Connector

log = logging.getLogger(__name__)
FETCH_TIMEOUT_MS = 200
GAUGE_INTERVAL_S = 2.0
CYCLE_WATCH_S = 10.0  # a commit cycle running this long: are its output topics still there?


class Session:
    """One group membership, from joining to leaving (see the module docstring)."""

    def __init__(self, connector: Connector) -> None:
        c = self._c = connector
        s = c.settings
        self._reader: TopicReader | None = None
        self.store = self._dedup_store()
        c.window.clear()  # a new session restores what it is assigned
        self.exposure = c._exposure = c._new_exposure(healthy=c._commit_healthy)
        self.pipeline = Pipeline(
            s, c.router, self.store, c.apps, c.metrics, self.exposure, c.parser
        )
        c.progress.forget(c.progress.partitions())  # the last session's assignment
        self.source = Source(s, self._on_revoked, self._on_assigned, c.metrics, c.progress)
        # after a fence, rejoin under a new transactional id: reusing ours would fence the
        # instance that fenced us, and the two would take turns forever
        suffix = f"-f{c._fences}" if c._fences else ""
        self.sink = Sink(
            s, self.source, client_kwargs(s), transactional_suffix=suffix, metrics=c.metrics
        )
        self._assigned: list[TopicPartitionKey] = []
        # aiokafka sets a new assignment (and may fetch) before it awaits the assign hook:
        # records of partitions still restoring their dedup state wait here, in order.
        self._restoring: set[TopicPartitionKey] = set()
        # partitions whose dedup entries in the window are current. aiokafka's eager
        # protocol revokes every partition at each rebalance; one given straight back to
        # us was owned by nobody in between, so its entries need no restore.
        self._dedup_held: set[TopicPartitionKey] = set()
        self._held: dict[TopicPartitionKey, list[InputRecord]] = {}
        # idle partitions new to this session whose committed offset was read
        self._marker_checked: dict[TopicPartitionKey, int] = {}
        self._fetch_paused = False  # the buffer is full: an assignment must not resume
        self._fatal: BaseException | None = None  # raised by a rebalance hook: ends it
        self._generation = 0  # one more at each revocation and assignment

    @property
    def assigned(self) -> list[TopicPartitionKey]:
        return self._assigned

    @property
    def fetch_paused(self) -> bool:
        """Fetching is paused for every partition: the buffer is full."""
        return self._fetch_paused

    def _dedup_store(self) -> DedupStore:
        s = self._c.settings
        if s.dedup.store == "memory":
            return MemoryDedupStore(self._c.window)
        reader = self._reader = TopicReader(s)
        group, suffix = s.kafka.group_id, s.dedup.changelog_suffix
        return ChangelogDedupStore(
            self._c.window,
            lambda topic: changelog_topic(group, topic, suffix),
            reader.read_changelog,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Join, work until ``stop``, drain, commit, leave. A fence or a failed commit
        raises ``FencedError`` (the caller starts a new session); what was not committed is
        forgotten with this object."""
        pipeline, sink, source = self.pipeline, self.sink, self.source
        exposure = self.exposure
        async with AsyncExitStack() as stack:
            await sink.start()
            stack.push_async_callback(sink.stop)
            await source.start()
            stack.push_async_callback(source.stop)  # leaves the group; runs before sink.stop
            draining = asyncio.Event()
            try:
                async with asyncio.TaskGroup() as tasks:
                    committer = tasks.create_task(self._commit_loop(pipeline, sink, draining))
                    gauges = tasks.create_task(self._gauge_loop(source, pipeline))
                    await self._fetch_loop(source, pipeline, tasks, stop)
                    # drain: stop fetching, let HTTP attempts finish, commit, then leave
                    deadline = self._c._deadline.start()
                    cut = await pipeline.abandon(
                        pipeline.tracker.partitions(), deadline.left(deadline.calls_until)
                    )
                    draining.set()  # the committer finishes its cycle and makes a last one
                    gauges.cancel()
                    await asyncio.wait({committer}, timeout=deadline.left(deadline.commit_until))
                    if not committer.done():
                        log.error(
                            "the last commit cycle did not finish before the drain deadline "
                            "(%s): not committed; its events will be replayed",
                            self._c._ready()[1],
                        )
                        committer.cancel()
                        raise FencedError("the last commit cycle missed the drain deadline")
            except BaseException as exc:
                # Entries remembered for outcomes that were never committed would drop their
                # replays as duplicates: forget them (the changelog restores what is durable).
                self._c.window.clear()
                self._dedup_held = set()
                self._c._commit_healthy = False  # and what was not committed is lost
                self._c._exposure = self._c._new_exposure(healthy=False)
                fenced = only_fenced(exc)
                if fenced is exc:
                    raise
                raise fenced from exc
            self._c._commit_healthy = exposure.healthy
            log.info("drained", extra={"cut_short": cut, **vars(pipeline.stats)})
            self._c._joined = False

    def buffered(self) -> int:
        """Events fetched and not finished, with those held for restoring partitions:
        what ``delivery.max_buffered_events`` bounds."""
        held = sum(len(records) for records in self._held.values())
        return held + self.pipeline.in_progress()

    async def _fetch_loop(
        self, source: Source, pipeline: Pipeline, tasks: asyncio.TaskGroup, stop: asyncio.Event
    ) -> None:
        """Fetch only what fits: ``delivery.max_buffered_events`` bounds the events fetched
        and not finished (held ones of restoring partitions included) at every moment. A
        fetch asks for the room left at most, and while the buffer is full (until it is
        half empty) every partition stays paused and only paused ones are polled."""
        limit = self._c.settings.delivery.max_buffered_events
        paused = self._fetch_paused = False
        while not stop.is_set():
            self._c._heartbeat = time.monotonic()
            if self._fatal is not None:
                fatal, self._fatal = self._fatal, None
                raise fatal
            for tp in [tp for tp in self._held if tp not in self._restoring]:
                for record in self._held.pop(tp):
                    pipeline.submit(record, tasks)
            busy = self.buffered()
            if not paused and busy >= limit:
                paused = self._fetch_paused = True
            elif paused and busy < max(1, limit // 2):
                source.resume([tp for tp in source.assignment() if tp not in self._restoring])
                paused = self._fetch_paused = False
            if paused:
                # every partition paused (an assignment may have added some); polling
                # paused partitions takes no record but keeps us in the group
                # (max.poll.interval.ms) while calls drain the buffer
                source.pause(source.assignment())
                self._c.metrics.partitions_paused.set(source.paused())
                records = await source.keep_alive(FETCH_TIMEOUT_MS)
            else:
                self._c.metrics.partitions_paused.set(source.paused())
                records = await source.fetch(FETCH_TIMEOUT_MS, max_records=limit - busy)
            if self._fatal is not None:
                continue  # a rebalance hook failed during the fetch: the loop's top ends it
            for record in records:
                if record.tp in self._restoring:
                    self._held.setdefault(record.tp, []).append(record)
                else:
                    pipeline.submit(record, tasks)

    async def _commit_loop(self, pipeline: Pipeline, sink: Sink, draining: asyncio.Event) -> None:
        """A commit cycle starts as soon as an outcome waits and the previous cycle is done:
        under load cycles run back to back and each takes what finished during the last
        one (the batch grows with the load); a lone event does not wait for a timer. With
        nothing to do, a cycle every ``commit_interval_ms`` all the same (keeps readiness's
        "last commit" fresh). Never cancelled mid-cycle (that would abort a transaction
        whose events the tracker already counts as done)."""
        interval = self._c.settings.delivery.commit_interval_ms / 1000
        work = pipeline.outcome_ready
        while True:
            await _first_set((work, draining), interval)
            # read before the cycle: the drain is signalled once every job has finished, so
            # a cycle that starts after it has seen every outcome and can be the last one
            last = draining.is_set()
            work.clear()  # before the cycle takes the outcomes: a later one sets it again
            watch = asyncio.create_task(self._watch_cycle())
            try:
                await pipeline.commit(sink)
            finally:
                await cancel(watch)
            if self._c.outputs_missing:
                log.info("output topics are back: %s", ", ".join(self._c.outputs_missing))
                self._c.outputs_missing = None
            self._c._last_commit_ok = time.monotonic()
            if last:
                return

    async def _watch_cycle(self) -> None:
        """While a commit cycle runs past CYCLE_WATCH_S, look every CYCLE_WATCH_S for an
        output topic that is gone: a deleted results, dead-letter or changelog topic held
        the cycle with no log line, and readiness said only "no successful commit cycle"
        a minute later. Now readiness names the topics, and one warning says it."""
        s = self._c.settings
        outputs = [s.kafka.results_topic, s.kafka.dead_letter_topic]
        if s.dedup.store == "changelog":
            group, suffix = s.kafka.group_id, s.dedup.changelog_suffix
            outputs += [changelog_topic(group, t, suffix) for t in self._c.input_partitions]
        while True:
            await asyncio.sleep(CYCLE_WATCH_S)
            try:
                async with TopicManager(s) as topics:
                    found = await topics.partitions(outputs)
            except Exception:  # noqa: BLE001, S112 (Kafka unreachable: the probe says so)
                continue
            missing = [t for t in outputs if t not in found] or None
            if missing and missing != self._c.outputs_missing:
                log.warning(
                    "a commit cycle waits for output topic(s) that do not exist: %s "
                    "(deleted? kafka.create_topics creates them only at start-up)",
                    ", ".join(missing),
                )
            self._c.outputs_missing = missing

    async def _gauge_loop(self, source: Source, pipeline: Pipeline) -> None:
        m = self._c.metrics
        while True:
            m.events_in_progress.set(self.buffered())
            m.dedup_entries.set(len(self._c.window))
            m.dedup_evictions.inc(self._c.window.evicted - self._c._evictions_reported)
            self._c._evictions_reported = self._c.window.evicted
            self._c.apps.update_gauges()
            for tp in source.assignment():
                high = source.highwater(tp)
                committed = pipeline.tracker.committed_position(tp)
                if high is not None and committed is not None:
                    m.consumer_lag.labels(tp[0], str(tp[1])).set(max(0, high - committed))
            await source.watch_progress()
            m.up.set(1 if self._c._ready()[0] else 0)
            await self._skip_markers(source, pipeline)
            await asyncio.sleep(GAUGE_INTERVAL_S)

    async def _skip_markers(self, source: Source, pipeline: Pipeline) -> None:
        """An input written by a transactional producer (a redrive, a transactional
        service) ends its partitions with a commit marker the consumer never hands out:
        the last record + 1 is one short of the end, and the lag would stay at 1 (and
        ``NoProgress`` alert) until the next record. An idle partition's position is moved
        up to the consumer's, past such markers, and the next cycle commits it."""
        tracker = pipeline.tracker
        generation = self._generation
        # our own view of the assignment: between a revocation and the next assignment the
        # consumer still lists the revoked partitions, at positions past records abandoned
        # uncommitted (skipping to one of those lost them: bench/chaos)
        for tp in list(self._assigned):
            if generation != self._generation:
                return  # a rebalance during an await: the next round sees the new one
            if tp in self._restoring or tp in self._held or tracker.pending(tp):
                continue
            high, known = source.highwater(tp), tracker.committed_position(tp)
            if high is None or (known is not None and known >= high):
                continue
            position = await source.position(tp)
            if position is None or position <= (known or -1):
                continue
            if known is None:  # not seen this session: what the group has committed
                if self._marker_checked.get(tp) == position:
                    continue
                self._marker_checked[tp] = position
                known = await source.committed(tp)
            # re-checked after the awaits: records fetched meanwhile move it themselves, and
            # a position read before a rebalance belongs to the assignment before it
            if generation != self._generation:
                return
            if tp not in self._held and not tracker.pending(tp):
                tracker.skip_to(tp, position, known)

    # -- rebalance ----------------------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartitionKey]) -> None:
        """Finish or abandon the partitions' work and commit what is done, then forget."""
        await self._guarded("revocation", self._revoke(revoked))

    async def _on_assigned(self, assigned: list[TopicPartitionKey]) -> None:
        """Restore dedup state first, then take our share of the group's rate."""
        await self._guarded("assignment", self._assign(assigned))

    async def _guarded(self, what: str, work: Awaitable[None]) -> None:
        """aiokafka only logs a rebalance hook's exception; here a failure ends the session
        (a failed restore, say, must not let processing go on without dedup state)."""
        try:
            await work
        except FencedError as exc:
            log.warning("partition %s ended the session, which restarts: %s", what, exc)
            self._fatal = exc
        except Exception as exc:
            log.exception("partition %s failed; the session restarts", what)
            self._fatal = exc if isinstance(exc, FencedError) else FencedError(str(exc))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # a real stop
            # a cancel nobody asked for, raised by a library's own task: a failure (it
            # ended aiokafka's coordinator task and with it the whole connector)
            log.exception("partition %s failed; the session restarts", what)
            self._fatal = FencedError(f"partition {what} failed: a stray cancellation")

    async def _revoke(self, revoked: list[TopicPartitionKey]) -> None:
        self._c.metrics.rebalances.labels("revoke").inc()
        pipeline, sink = self.pipeline, self.sink
        self._c.apps.stop_calls()  # no new calls until the new assignment sets our share
        self._generation += 1
        try:
            await pipeline.abandon(revoked, self._c.settings.delivery.revoke_timeout_s)
            await pipeline.commit(sink)
        finally:
            # forgotten even when the commit failed (the session then ends): the partitions'
            # new positions come from the committed offsets, whoever owns them next
            pipeline.forget(revoked)
        gone = set(revoked)
        self._restoring -= gone
        for tp in gone:
            self._held.pop(tp, None)  # uncommitted: the next owner fetches them again
            self._marker_checked.pop(tp, None)
        for tp in gone:
            with contextlib.suppress(KeyError):
                self._c.metrics.consumer_lag.remove(tp[0], str(tp[1]))
        self._assigned = [tp for tp in self._assigned if tp not in gone]
        log.info("partitions revoked", extra={"partitions": len(revoked)})

    async def _assign(self, assigned: list[TopicPartitionKey]) -> None:
        self._c.metrics.rebalances.labels("assign").inc()
        self._generation += 1
        added = [tp for tp in assigned if tp[1] >= self._c.input_partitions.get(tp[0], 0)]
        if added:
            # partitions were added to an input topic while running: count them (the rate
            # share) and grow the changelogs; the producer knows only the changelogs' old
            # partitions (aiokafka asserts "Unrecognized partition" on a send to a new one:
            # a crash), so a new session with fresh clients takes the assignment
            self._c.input_partitions = await self._c._ensure_topics()
            if self._reader is not None:
                raise FencedError(
                    f"input partitions added ({len(added)} assigned here): rejoining with "
                    f"the dedup changelogs grown to {self._c.input_partitions}"
                )
        self._assigned = list(assigned)
        self._restoring |= set(assigned)
        self.source.pause(assigned)
        started = time.monotonic()
        self.store.forget(self._dedup_held - set(assigned))
        fresh = [tp for tp in assigned if tp not in self._dedup_held]
        self._dedup_held = set()  # until the restore has finished
        restored = await asyncio.wait_for(
            self.store.restore(fresh), self._c.settings.dedup.restore_timeout_s
        )
        self._dedup_held = set(assigned)
        self._restoring -= set(assigned)
        if not self._fetch_paused:
            self.source.resume(assigned)  # else the fetch loop resumes them with the rest
        self._c.metrics.dedup_restored.inc(restored)
        self._apply_share()
        self._c.metrics.partitions_assigned.set(len(assigned))
        self._c._joined = True
        log.info(
            "partitions assigned",
            extra={
                "partitions": len(assigned),
                "dedup_restored": restored,
                "restore_s": round(time.monotonic() - started, 3),
                "rate_per_s": self._c.apps.rates(),
            },
        )

    def _apply_share(self) -> None:
        """Each app's share of its own group rate (``connector.apps``)."""
        self._c.apps.apply_share(len(self._assigned), sum(self._c.input_partitions.values()))


def only_fenced(exc: BaseException) -> BaseException:
    """A TaskGroup wraps its failures in an ExceptionGroup: when every one of them is a
    FencedError, the session ends by a fence (and restarts); anything else propagates."""
    if isinstance(exc, BaseExceptionGroup):
        fenced, rest = exc.split(FencedError)
        if fenced is not None and rest is None:
            first: BaseException = fenced
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first
    return exc


async def cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _first_set(events: tuple[asyncio.Event, ...], timeout_s: float) -> None:
    """Return when one of ``events`` is set, or after ``timeout_s``."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
