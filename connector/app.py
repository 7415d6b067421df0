"""Composition root and lifecycle.

``Connector.run(stop)`` owns everything for the process: the health server, the HTTP
client, the topics, and a loop of *sessions*. A session is one consumer-group membership
with one producer (transactional in ``exactly_once`` mode); a fenced producer or a failed
commit ends the session without committing, and a new one starts from the committed
offsets (what was not committed is replayed and deduplicated).

Shutdown (``stop`` set, e.g. by SIGTERM): stop fetching, cancel jobs that are not inside
an HTTP attempt, let attempts finish, run a last commit cycle, leave the group -- all within
``delivery.drain_timeout_s`` of the stop, whatever the state (a commit cycle waiting for a
deleted topic, a broker that does not answer): ``StopDeadline`` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from typing import Any

from connector.apps import Apps
from connector.changelog_watch import ChangelogWatch
from connector.config import ConnectorSettings
from connector.dedup import (
    ChangelogDedupStore,
    Clock,
    DedupStore,
    DedupWindow,
    MemoryDedupStore,
    changelog_topic,
)
from connector.errors import FencedError
from connector.events import InputRecord, TopicPartitionKey
from connector.exposure import Exposure
from connector.formats import Parser
from connector.health import HealthServer
from connector.kafka_common import (
    BootstrapNoise,
    OutageNoise,
    client_kwargs,
    describe_failure,
    diagnose,
    needs_diagnosis,
)
from connector.metrics import Metrics
from connector.pipeline import Pipeline
from connector.progress import PartitionProgress
from connector.registry import SchemaRegistry
from connector.routing import Router
from connector.sink import Sink
from connector.source import Source, TopicReader
from connector.topics import TopicManager
from connector.tracing import TRACING

log = logging.getLogger(__name__)
FETCH_TIMEOUT_MS = 200
GAUGE_INTERVAL_S = 2.0
CYCLE_WATCH_S = 10.0  # a commit cycle running this long: are its output topics still there?
LIVENESS_STALE_S = 60.0


class Connector:
    """One connector process (or one of several in a test process)."""

    def __init__(
        self,
        settings: ConnectorSettings,
        metrics: Metrics | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        """``clock``: the dedup window's time (epoch seconds); tests move it to stand for
        a restart minutes or days later."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.router = Router(settings.routes)
        self.apps = Apps(settings, self.metrics)  # one call policy per app (connector.apps)
        # records to events by their topic's format; the registry only if a format needs it
        self.registry = (
            SchemaRegistry(settings.schema_registry, self.metrics)
            if settings.schema_registry.url is not None
            else None
        )
        self.parser = Parser(settings, self.registry)
        self.health = HealthServer(
            settings.server.host,
            settings.server.port,
            self.metrics.registry,
            self._live,
            self._ready,
            max_connections=settings.server.max_connections,
            header_timeout_s=settings.server.header_timeout_s,
            metrics_cache_s=settings.server.metrics_cache_s,
        )
        # partitions stopped (offset out of range) or blocked (an open upstream transaction)
        self.progress = PartitionProgress(self.metrics, settings.kafka.blocked_partition_after_s)
        self.window = DedupWindow(settings.dedup.ttl_s, settings.dedup.max_entries, clock)
        # the session's gate on calls: its gauges are read when scraped (the gate also
        # closes by the clock alone, a stalled cycle, and a call needs no gauge write)
        self._exposure = self._new_exposure(healthy=True)
        self.metrics.uncommitted_threads.set_function(lambda: self._exposure.held)
        self.metrics.calls_gate_closed.set_function(lambda: 0 if self._exposure.is_open else 1)
        self.metrics.threads_awaiting_commit.set_function(lambda: self._exposure.created)
        self.input_partitions: dict[str, int] = {}
        self.pipeline: Pipeline | None = None
        self._assigned: list[TopicPartitionKey] = []
        self._joined = False
        self._heartbeat = time.monotonic()
        self._last_commit_ok = time.monotonic()
        self._evictions_reported = 0
        self._reader: TopicReader | None = None
        self._sink: Sink | None = None
        self._source: Source | None = None
        # aiokafka sets a new assignment (and may fetch) before it awaits the assign hook:
        # records of partitions still restoring their dedup state wait here, in order.
        self._restoring: set[TopicPartitionKey] = set()
        # partitions whose dedup entries in the window are current. aiokafka's eager protocol
        # revokes every partition at each rebalance; one given straight back to us was owned
        # by nobody in between, so its entries need no restore.
        self._dedup_held: set[TopicPartitionKey] = set()
        self._held: dict[TopicPartitionKey, list[InputRecord]] = {}
        # idle partitions new to this session whose committed offset was read (_skip_markers)
        self._marker_checked: dict[TopicPartitionKey, int] = {}
        self._fetch_paused = False  # the buffer is full: an assignment must not resume
        self._store: DedupStore = MemoryDedupStore(self.window)
        self._fatal: BaseException | None = None  # raised by a rebalance hook, ends the session
        self._generation = 0  # one more at each revocation and assignment
        self._fences = 0
        # the last commit cycle succeeded: a session after a failed one starts with calls
        # stopped until its first cycle succeeds (``Exposure``)
        self._commit_healthy = True
        self.sessions = 0
        self._deadline = StopDeadline(settings.delivery.drain_timeout_s)
        self.started = asyncio.Event()
        # why Kafka cannot be used right now (None: no known problem); read by /readyz
        self.kafka_problem: str | None = None
        self.kafka_attempts = 0  # consecutive failed attempts to start / to keep a session
        # set by the reachability probe while a session runs: aiokafka retries a lost broker
        # quietly for ever, and an idle pipeline's commit cycles need no broker
        self.kafka_unreachable: str | None = None
        # output topics a stuck commit cycle waits for (deleted with auto-create off): the
        # producer retries them silently and forever
        self.outputs_missing: list[str] | None = None
        # the dedup changelogs' configuration, re-checked while running
        self.changelogs = ChangelogWatch(settings, lambda: self.input_partitions)

    # -- health -------------------------------------------------------------------------

    def _live(self) -> tuple[bool, str]:
        # a revoke may hold the fetch loop while calls under way finish: not a hang
        stale_s = max(LIVENESS_STALE_S, self.settings.delivery.revoke_timeout_s + 30)
        age = time.monotonic() - self._heartbeat
        return age < stale_s, f"loop heartbeat {age:.1f}s ago"

    # Called from the health server's own thread: read simple attributes only.

    def _ready(self) -> tuple[bool, str]:
        lost = self.kafka_unreachable
        if lost is not None:
            return False, f"kafka: {lost} (probed every {self.settings.kafka.probe_interval_s:g}s)"
        problem = self.kafka_problem
        if problem is not None and not self._joined:
            return False, f"kafka: {problem} (attempt {self.kafka_attempts}, retrying)"
        if not self._joined:
            return False, "not in the consumer group yet"
        changelog = self.changelogs.problem
        if changelog is not None:
            return False, changelog
        paused = self.apps.pause_reason()
        if paused is not None:
            return False, paused
        registry = self.registry
        if registry is not None and registry.problem is not None:
            return False, registry.problem
        if self.outputs_missing:
            return False, (
                f"kafka: output topic(s) {', '.join(self.outputs_missing)} do not exist; "
                f"commit cycles wait for them"
            )
        stuck = self.progress.summary
        if stuck is not None:
            return False, stuck
        age = time.monotonic() - self._last_commit_ok
        if age > max(60.0, self.settings.kafka.session_timeout_ms / 1000 * 2):
            return False, f"no successful commit cycle for {age:.0f}s"
        return True, f"{len(self._assigned)} partitions assigned"

    # -- run ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop``; then return within ``delivery.drain_timeout_s`` (what is
        not committed by then is replayed by the next owner)."""
        self._deadline = StopDeadline(self.settings.delivery.drain_timeout_s)
        body = asyncio.ensure_future(self._run(stop))
        try:
            await _first_done(body, stop)
            if not body.done():
                self._deadline.start()
                await asyncio.wait({body}, timeout=self._deadline.left(self._deadline.cancel_at))
            if not body.done():
                log.error(
                    "shutdown did not finish within delivery.drain_timeout_s (%gs): stopping "
                    "now; what was not committed will be replayed",
                    self.settings.delivery.drain_timeout_s,
                )
                body.cancel()
                await asyncio.wait({body}, timeout=self._deadline.left())
        except asyncio.CancelledError:
            body.cancel()
            raise
        if body.done() and not body.cancelled():
            body.result()

    async def _run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            await self.health.start()
            stack.push_async_callback(self.health.stop)
            if s.tracing.enabled:
                TRACING.start(s.tracing.service_name)
                stack.callback(TRACING.shutdown)  # flushes the last spans
            self.apps.start(stack)  # each app's HTTP client and caller
            if self.registry is not None:
                stack.push_async_callback(self.registry.close)
            aiokafka_log = logging.getLogger("aiokafka")
            for quiet in (BootstrapNoise(), OutageNoise()):
                # our one line per attempt replaces aiokafka's; its reconnects are sampled
                aiokafka_log.addFilter(quiet)
                stack.callback(aiokafka_log.removeFilter, quiet)
            if not await self._until_topics_ready(stop):
                return
            self.metrics.init_topics(self.input_partitions)
            log.info(
                "connector started",
                extra={
                    "inputs": self.input_partitions,
                    "mode": s.delivery.mode.value,
                    "metrics_port": self.health.port,
                },
            )
            self.started.set()
            probe = asyncio.create_task(self._probe_kafka(stop))
            stack.push_async_callback(_cancel, probe)
            if s.dedup.store == "changelog":
                watch = asyncio.create_task(self.changelogs.run(stop))
                stack.push_async_callback(_cancel, watch)
            while not stop.is_set():
                self.sessions += 1
                try:
                    await self._session(stop)
                except FencedError as exc:
                    self._fences += 1
                    self.metrics.fenced.inc()
                    log.warning("session ended without committing, rejoining: %s", exc)
                    await _sleep_unless(stop, 1.0 + random.random())
                except Exception as exc:  # noqa: BLE001 (classified; unknown ones re-raised)
                    if self._joined:
                        self.kafka_attempts = 0  # it had worked: a new problem
                    self._joined = False
                    await self._kafka_failed("session", exc, stop)
        log.info("connector stopped")

    async def _probe_kafka(self, stop: asyncio.Event) -> None:
        """Open a connection to the bootstrap servers every ``kafka.probe_interval_s``
        (TLS and SASL included); two failures in a row turn readiness red with the cause,
        one success turns it back. Logged once per change, not per probe."""
        interval = self.settings.kafka.probe_interval_s
        failures = 0
        while not stop.is_set():
            await _sleep_unless(stop, interval)
            if stop.is_set():
                return
            cause = await diagnose(self.settings, timeout_s=max(interval, 5.0))
            failures = failures + 1 if cause is not None else 0
            if cause is not None and failures >= 2 and self.kafka_unreachable is None:
                log.warning("kafka is not reachable: %s", cause, extra={"kafka_problem": cause})
                self.kafka_unreachable = cause
            elif cause is None and self.kafka_unreachable is not None:
                log.info("kafka is reachable again")
                self.kafka_unreachable = None

    async def _until_topics_ready(self, stop: asyncio.Event) -> bool:
        """Check/create the topics until it works (False if stopped first). Kafka being
        unreachable, refusing the credentials or the certificate, or a topic missing does
        not end the process: it stays up, not ready, and says why."""
        while not stop.is_set():
            # raced with ``stop``: a broker that accepts connections and never answers (a
            # paused JVM, a half-open network) held SIGTERM for the whole request timeout,
            # past a pod's grace period. Nothing is consumed yet, so nothing is lost.
            attempt = asyncio.ensure_future(self._ensure_topics())
            await _first_done(attempt, stop)
            if not attempt.done():
                with contextlib.suppress(Exception):  # its failure no longer matters
                    await _cancel(attempt)
                return False
            try:
                self.input_partitions = attempt.result()
            except Exception as exc:  # noqa: BLE001 (classified; unknown ones re-raised)
                await self._kafka_failed("start-up", exc, stop)
            else:
                self.kafka_problem = None
                self.kafka_attempts = 0
                return True
        return False

    async def _ensure_topics(self) -> dict[str, int]:
        async with TopicManager(self.settings) as topics:
            return await topics.ensure()

    async def _kafka_failed(self, stage: str, exc: Exception, stop: asyncio.Event) -> None:
        """One log line with the cause, readiness red with it, then a capped exponential
        backoff (the loop heartbeat goes on: waiting for Kafka is not a hang)."""
        cause = describe_failure(exc)
        if cause is None:
            raise exc
        if needs_diagnosis(exc):
            cause = await diagnose(self.settings) or cause  # aiokafka only logged the cause
        self.kafka_attempts += 1
        self.kafka_problem = cause
        k = self.settings.kafka
        delay = min(k.retry_max_s, k.retry_initial_s * 2 ** min(self.kafka_attempts - 1, 30))
        delay *= 0.8 + 0.4 * random.random()
        log.warning(
            "kafka %s failed (attempt %d), retrying in %.1fs: %s",
            stage, self.kafka_attempts, delay, cause,
            extra={"kafka_problem": cause, "attempt": self.kafka_attempts},
        )  # fmt: skip
        deadline = time.monotonic() + delay
        while not stop.is_set() and time.monotonic() < deadline:
            self._heartbeat = time.monotonic()
            await _sleep_unless(stop, min(1.0, deadline - time.monotonic()))
        self._heartbeat = time.monotonic()

    async def _session(self, stop: asyncio.Event) -> None:
        s = self.settings
        kwargs = client_kwargs(s)
        store = self._dedup_store()
        self.window.clear()  # a new session restores what it is assigned
        self._dedup_held = set()
        self._marker_checked = {}
        # records held for a restore of the last session (one ended by a fence or a failed
        # restore) are the new consumer's to fetch again from the committed offsets: kept,
        # they were submitted twice (the tracker refused the second: the replica crashed)
        self._held = {}
        self._restoring = set()
        self._assigned = []
        self._fatal = None  # a hook's failure as the last session left the group was its own
        self._generation += 1
        exposure = self._exposure = self._new_exposure(healthy=self._commit_healthy)
        pipeline = Pipeline(s, self.router, store, self.apps, self.metrics, exposure, self.parser)
        self.pipeline = pipeline
        self.progress.forget(self.progress.partitions())  # the last session's assignment
        source = Source(s, self._on_revoked, self._on_assigned, self.metrics, self.progress)
        # after a fence, rejoin under a new transactional id: reusing ours would fence the
        # instance that fenced us, and the two would take turns forever
        suffix = f"-f{self._fences}" if self._fences else ""
        sink = Sink(s, source, kwargs, transactional_suffix=suffix, metrics=self.metrics)
        self._sink = sink
        self._source = source
        self._store = store
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
                    deadline = self._deadline.start()
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
                            self._ready()[1],
                        )
                        committer.cancel()
                        raise FencedError("the last commit cycle missed the drain deadline")
            except BaseException as exc:
                # Entries remembered for outcomes that were never committed would drop their
                # replays as duplicates: forget them (the changelog restores what is durable).
                self.window.clear()
                self._dedup_held = set()
                self._commit_healthy = False  # and what was not committed is lost
                self._exposure = self._new_exposure(healthy=False)
                fenced = _only_fenced(exc)
                if fenced is exc:
                    raise
                raise fenced from exc
            self._commit_healthy = exposure.healthy
            log.info("drained", extra={"cut_short": cut, **vars(pipeline.stats)})
            self._joined = False

    def _new_exposure(self, *, healthy: bool) -> Exposure:
        d = self.settings.delivery
        return Exposure(d.max_uncommitted_threads, d.commit_stall_s, healthy=healthy)

    def buffered(self) -> int:
        """Events fetched and not finished, with those held for restoring partitions:
        what ``delivery.max_buffered_events`` bounds."""
        held = sum(len(records) for records in self._held.values())
        return held + (self.pipeline.in_progress() if self.pipeline is not None else 0)

    def _dedup_store(self) -> DedupStore:
        s = self.settings
        if s.dedup.store == "memory":
            self._reader = None
            return MemoryDedupStore(self.window)
        self._reader = TopicReader(s)
        group, suffix = s.kafka.group_id, s.dedup.changelog_suffix
        return ChangelogDedupStore(
            self.window,
            lambda topic: changelog_topic(group, topic, suffix),
            self._reader.read_changelog,
        )

    async def _fetch_loop(
        self, source: Source, pipeline: Pipeline, tasks: asyncio.TaskGroup, stop: asyncio.Event
    ) -> None:
        """Fetch only what fits: ``delivery.max_buffered_events`` bounds the events fetched
        and not finished (held ones of restoring partitions included) at every moment. A
        fetch asks for the room left at most, and while the buffer is full (until it is
        half empty) every partition stays paused and only paused ones are polled."""
        limit = self.settings.delivery.max_buffered_events
        paused = self._fetch_paused = False
        while not stop.is_set():
            self._heartbeat = time.monotonic()
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
                self.metrics.partitions_paused.set(source.paused())
                records = await source.keep_alive(FETCH_TIMEOUT_MS)
            else:
                self.metrics.partitions_paused.set(source.paused())
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
        interval = self.settings.delivery.commit_interval_ms / 1000
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
                await _cancel(watch)
            if self.outputs_missing:
                log.info("output topics are back: %s", ", ".join(self.outputs_missing))
                self.outputs_missing = None
            self._last_commit_ok = time.monotonic()
            if last:
                return

    async def _watch_cycle(self) -> None:
        """While a commit cycle runs past CYCLE_WATCH_S, look every CYCLE_WATCH_S for an
        output topic that is gone: a deleted results, dead-letter or changelog topic held
        the cycle with no log line, and readiness said only "no successful commit cycle"
        a minute later. Now readiness names the topics, and one warning says it."""
        s = self.settings
        outputs = [s.kafka.results_topic, s.kafka.dead_letter_topic]
        if s.dedup.store == "changelog":
            group, suffix = s.kafka.group_id, s.dedup.changelog_suffix
            outputs += [changelog_topic(group, t, suffix) for t in self.input_partitions]
        while True:
            await asyncio.sleep(CYCLE_WATCH_S)
            try:
                async with TopicManager(s) as topics:
                    found = await topics.partitions(outputs)
            except Exception:  # noqa: BLE001, S112 (Kafka unreachable: the probe says so)
                continue
            missing = [t for t in outputs if t not in found] or None
            if missing and missing != self.outputs_missing:
                log.warning(
                    "a commit cycle waits for output topic(s) that do not exist: %s "
                    "(deleted? kafka.create_topics creates them only at start-up)",
                    ", ".join(missing),
                )
            self.outputs_missing = missing

    async def _gauge_loop(self, source: Source, pipeline: Pipeline) -> None:
        m = self.metrics
        while True:
            m.events_in_progress.set(self.buffered())
            m.dedup_entries.set(len(self.window))
            m.dedup_evictions.inc(self.window.evicted - self._evictions_reported)
            self._evictions_reported = self.window.evicted
            self.apps.update_gauges()
            for tp in source.assignment():
                high = source.highwater(tp)
                committed = pipeline.tracker.committed_position(tp)
                if high is not None and committed is not None:
                    m.consumer_lag.labels(tp[0], str(tp[1])).set(max(0, high - committed))
            await source.watch_progress()
            m.up.set(1 if self._ready()[0] else 0)
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
        self.metrics.rebalances.labels("revoke").inc()
        pipeline, sink = self.pipeline, self._sink
        if pipeline is None or sink is None:
            return
        self.apps.stop_calls()  # no new calls until the new assignment sets our share
        self._generation += 1
        try:
            await pipeline.abandon(revoked, self.settings.delivery.revoke_timeout_s)
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
                self.metrics.consumer_lag.remove(tp[0], str(tp[1]))
        self._assigned = [tp for tp in self._assigned if tp not in gone]
        log.info("partitions revoked", extra={"partitions": len(revoked)})

    async def _assign(self, assigned: list[TopicPartitionKey]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        self._generation += 1
        added = [tp for tp in assigned if tp[1] >= self.input_partitions.get(tp[0], 0)]
        if added:
            # partitions were added to an input topic while running: count them (the rate
            # share) and grow the changelogs; the producer knows only the changelogs' old
            # partitions (aiokafka asserts "Unrecognized partition" on a send to a new one:
            # a crash), so a new session with fresh clients takes the assignment
            self.input_partitions = await self._ensure_topics()
            if self._reader is not None:
                raise FencedError(
                    f"input partitions added ({len(added)} assigned here): rejoining with "
                    f"the dedup changelogs grown to {self.input_partitions}"
                )
        self._assigned = list(assigned)
        self._restoring |= set(assigned)
        if self._source is not None:
            self._source.pause(assigned)
        started = time.monotonic()
        self._store.forget(self._dedup_held - set(assigned))
        fresh = [tp for tp in assigned if tp not in self._dedup_held]
        self._dedup_held = set()  # until the restore has finished
        restored = await asyncio.wait_for(
            self._store.restore(fresh), self.settings.dedup.restore_timeout_s
        )
        self._dedup_held = set(assigned)
        self._restoring -= set(assigned)
        if self._source is not None and not self._fetch_paused:
            self._source.resume(assigned)  # else the fetch loop resumes them with the rest
        self.metrics.dedup_restored.inc(restored)
        self._apply_share()
        self.metrics.partitions_assigned.set(len(assigned))
        self._joined = True
        log.info(
            "partitions assigned",
            extra={
                "partitions": len(assigned),
                "dedup_restored": restored,
                "restore_s": round(time.monotonic() - started, 3),
                "rate_per_s": self.apps.rates(),
            },
        )

    def _apply_share(self) -> None:
        """Each app's share of its own group rate (``connector.apps``)."""
        self.apps.apply_share(len(self._assigned), sum(self.input_partitions.values()))


class StopDeadline:
    """The shutdown's time line, from the stop to ``drain_timeout_s`` after it: calls under
    way may finish until ``calls_until``, the last commit cycle until ``commit_until``, then
    the session is cancelled (``cancel_at``); the command line exits the process at the
    end whatever is left (``connector.cli``). Offsets in seconds after the stop."""

    def __init__(self, drain_s: float) -> None:
        reserve = min(2.0, drain_s * 0.1)
        self.total = drain_s
        self.calls_until = drain_s - 2 * reserve
        self.commit_until = drain_s - reserve
        self.cancel_at = drain_s - reserve / 2
        self._started: float | None = None

    def start(self) -> StopDeadline:
        """The stop happened now (a second call keeps the first time)."""
        if self._started is None:
            self._started = time.monotonic()
        return self

    def left(self, offset_s: float | None = None) -> float:
        """Seconds until ``offset_s`` after the stop (the end by default), at least 0."""
        started = self._started if self._started is not None else time.monotonic()
        end = self.total if offset_s is None else offset_s
        return max(0.0, started + end - time.monotonic())


def _only_fenced(exc: BaseException) -> BaseException:
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


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _first_done(work: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Return when ``work`` is done or ``stop`` is set, whichever comes first."""
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


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


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
