"""The flow for each record: parse → route → dedup → (order) → call → outcome → commit.

Each fetched record becomes a job (a task). A job ends in an *outcome*: a result record
(plus its dedup record), a dead-letter record, or a dedup hit with no record. Outcomes
are made durable in commit cycles (``Sink.commit_cycle``), which also mark their offsets
done and commit the contiguous positions.

Revocation and drain: a job not inside an HTTP attempt is cancelled at once (its offset
stays uncommitted, the next owner replays it); a job inside an attempt may finish up to a
deadline, so a rebalance never leaves a created thread without its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from connector.apps import Apps
from connector.calls import Abandoned, ThreadCaller
from connector.config import ConnectorSettings, Ordering
from connector.dedup import DedupStore, InFlight, Seen
from connector.errors import EventRejected, Stage
from connector.events import (
    Event,
    InputRecord,
    OutRecord,
    ThreadCreated,
    TopicPartitionKey,
    dead_letter_record,
    result_record,
)
from connector.exposure import Exposure
from connector.formats import Parser
from connector.metrics import Metrics
from connector.offsets import OffsetTracker
from connector.routing import Router, render_event
from connector.sink import CommitError, Sink
from connector.tracing import TRACING

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One record's processing; shared flags with the caller (``CallGuard``)."""

    record: InputRecord
    task: asyncio.Task[None] | None = None
    calling: bool = False
    abandoned: bool = False
    previous: asyncio.Future[None] | None = None  # key ordering: the job before ours
    turn: asyncio.Future[None] | None = None  # key ordering: ours, for the next job


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an event finished, and the records that make it durable."""

    tp: TopicPartitionKey
    offset: int
    records: tuple[OutRecord, ...] = ()
    kind: str = "duplicate"  # result | dead_letter | duplicate
    event_ts_ms: int = 0
    stage: str = ""
    code: str = ""
    spans: tuple[Any, ...] = ()  # tracing: the publish span, ended with the commit
    app: str = ""  # a dead letter's app, once a route chose one


@dataclass
class _Stats:
    results: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    abandoned: int = 0


class Pipeline:
    """Per-session state: jobs, outcomes waiting for a commit, offsets, in-flight claims."""

    def __init__(
        self,
        settings: ConnectorSettings,
        router: Router,
        store: DedupStore,
        caller: ThreadCaller | Apps,
        metrics: Metrics,
        exposure: Exposure | None = None,
        parser: Parser | None = None,
    ) -> None:
        """``exposure``: the gate on calls whose results are not committed (a session
        after a failed commit passes one that starts closed); ``parser``: records to
        events by their topic's format (default: every topic JSON)."""
        self._s = settings
        self._parser = parser or Parser(settings)
        self._forward = frozenset(name.lower() for name in settings.results.forward_headers)
        self._router = router
        self._store = store
        self._caller = caller
        self._m = metrics
        self.tracker = OffsetTracker()
        self._jobs: dict[TopicPartitionKey, set[Job]] = {}
        self._inflight = InFlight()
        self._outcomes: list[Outcome] = []
        self._key_tails: dict[tuple[TopicPartitionKey, bytes | None], asyncio.Future[None]] = {}
        self._commit_lock = asyncio.Lock()
        self._failed: BaseException | None = None  # a failed commit cycle: no more cycles
        d = settings.delivery
        self.exposure = exposure or Exposure(d.max_uncommitted_threads, d.commit_stall_s)
        self.outcome_ready = asyncio.Event()  # set with each outcome: a commit cycle may start
        self.stats = _Stats()

    # -- intake -------------------------------------------------------------------------

    def submit(self, record: InputRecord, tasks: asyncio.TaskGroup) -> None:
        """Track the record's offset and start its job (synchronous: keeps fetch order)."""
        tp = record.tp
        self.tracker.add(tp, record.offset)
        self._m.events_consumed.labels(record.topic).inc()
        job = Job(record)
        if self._s.delivery.ordering is Ordering.KEY and record.key is not None:
            loop = asyncio.get_running_loop()
            key = (tp, record.key)
            job.previous = self._key_tails.get(key)
            job.turn = loop.create_future()
            self._key_tails[key] = job.turn
        self._jobs.setdefault(tp, set()).add(job)
        job.task = tasks.create_task(self._run(job))

    def in_progress(self) -> int:
        return self.tracker.pending()

    async def _run(self, job: Job) -> None:
        if TRACING.on:  # the one check per event while tracing is off
            await self._traced(job)
            return
        await self._run_job(job)

    async def _run_job(self, job: Job) -> Outcome | None:
        record = job.record
        try:
            outcome = await self._handle(job)
        except (Abandoned, asyncio.CancelledError):
            self.stats.abandoned += 1
            return None  # offset stays uncommitted: the partition's next owner replays it
        finally:
            self._finish_turn(job)
            jobs = self._jobs.get(record.tp)
            if jobs is not None:
                jobs.discard(job)
        self._outcomes.append(outcome)
        self.outcome_ready.set()
        return outcome

    async def _traced(self, job: Job) -> None:
        """``_run_job`` inside the event's span (its parent: the record's traceparent)."""
        span, token = TRACING.event_span(job.record, self._s.kafka.group_id)
        outcome: Outcome | None = None
        try:
            outcome = await self._run_job(job)
        finally:
            kind, code = (outcome.kind, outcome.code) if outcome else ("abandoned", "")
            TRACING.end_event(span, token, kind, code)

    def _finish_turn(self, job: Job) -> None:
        if job.turn is None:
            return
        if not job.turn.done():
            job.turn.set_result(None)
        key = (job.record.tp, job.record.key)
        if self._key_tails.get(key) is job.turn:
            del self._key_tails[key]

    async def _handle(self, job: Job) -> Outcome:
        record = job.record
        if self._store.dead_lettered(record.tp, record.offset):
            # dead-lettered above the committed position before a restart or rebalance:
            # its dead letter is durable already (a redriven copy has a new offset)
            self._m.dedup_hits.labels(record.topic, "dead_letter").inc()
            return Outcome(record.tp, record.offset)
        if record.undecodable is not None:
            rejected = EventRejected(Stage.PARSE, record.undecodable, code="undecodable_record")
            return self._dead(record, rejected)
        parser = self._parser
        try:
            if parser.plain(record.topic):
                event = parser.parse(record)
            else:  # a schema-registry format: may wait for the registry
                event = await parser.decode(record)
        except EventRejected as exc:
            return self._dead(record, exc)
        key = event.dedup_key
        if self._store.seen(record.tp, key) is not None:
            self._m.dedup_hits.labels(record.topic, "window").inc()
            return Outcome(record.tp, record.offset)
        waiter = self._inflight.claim(record.tp, key)
        if waiter is not None:
            await waiter  # the first copy's call: one call for both
            self._m.dedup_hits.labels(record.topic, "in_flight").inc()
            return Outcome(record.tp, record.offset)
        try:
            return await self._call(job, event)
        finally:
            self._inflight.release(record.tp, key)

    async def _call(self, job: Job, event: Event) -> Outcome:
        record = job.record
        try:
            if TRACING.on:
                with TRACING.span("route", attributes={"event.type": event.event_type}):
                    route, request = self._router.build(event)
            else:
                route, request = self._router.build(event)
            # the deep link's event fields are checked before the call: once the thread
            # exists, its result must be published, and a render failure then stopped the
            # replica with the thread created (and the replay created another)
            self._deep_link(event, route.app_uid, None)
        except EventRejected as exc:
            return self._dead(record, exc, event.event_id, event.correlation_id)
        if job.previous is not None:
            await job.previous
        admitted = False

        async def admit() -> None:
            """The exposure unit is taken in the concurrency slot before the first token
            (again after a ``release``): calls queued for a slot or a token are not
            exposure yet."""
            nonlocal admitted
            if not admitted:
                await self._enter_gate()
                admitted = True

        def release() -> None:
            """The event waits after a 4xx: no thread, its unit goes back until it tries
            again (a paused route's events must not starve the others)."""
            nonlocal admitted
            if admitted:
                admitted = False
                self.exposure.leave()

        try:
            created = await self._caller.call(
                request,
                event.event_id,
                event.correlation_id,
                guard=job,
                admit=admit,
                release=release,
            )
        except EventRejected as exc:
            if admitted:
                self.exposure.leave()  # refused: no thread to commit
            return self._dead(record, exc, event.event_id, event.correlation_id, route.app_uid)
        except BaseException:
            if admitted:
                self.exposure.leave()  # abandoned or cancelled: the replay is the next owner's
            raise
        self.exposure.thread_created()
        deep_link = self._deep_link(event, route.app_uid, created)
        records = [
            result_record(
                self._s.kafka.results_topic,
                event,
                app_uid=route.app_uid,
                created=created,
                deep_link=deep_link,
                user_key=request.user_key,
                forward_headers=self._forward,
            )
        ]
        spans: tuple[Any, ...] = ()
        if TRACING.on:
            publish = TRACING.publish_span(self._s.kafka.results_topic, "result")
            records[0] = TRACING.with_trace_headers(records[0], publish)
            spans = (publish,)
        changelog = self._store.remember(
            record.tp, Seen(event.dedup_key, self._store.window.now(), created.thread_uid)
        )
        if changelog is not None:
            records.append(changelog)
        self._m.threads_created.labels(record.topic, route.app_uid).inc()
        if log.isEnabledFor(logging.DEBUG):  # the hot path: the result record says it all
            log.debug(
                "thread created",
                extra={
                    "event_id": event.event_id,
                    "correlation_id": event.correlation_id,
                    "thread_uid": created.thread_uid,
                    "attempts": created.attempts,
                },
            )
        return Outcome(
            record.tp, record.offset, tuple(records), "result", record.timestamp_ms, spans=spans
        )

    def _deep_link(self, event: Event, app_uid: str, created: ThreadCreated | None) -> str:
        """The result's deep link, each value percent-encoded (a threadUid or an event field
        with ``/``, ``?``, ``#`` cannot rewrite it); ``created`` None: a check before the
        call (the API's values are then empty), raising EventRejected if the event cannot
        render it."""
        values = {
            "threadUid": created.thread_uid if created else "",
            "humanUid": created.human_uid if created else "",
            "agentUid": created.agent_uid if created else "",
            "appUid": app_uid,
            "eventId": event.event_id,
        }
        return render_event(self._s.results.deep_link_template, event.body, values, url=True)

    async def _enter_gate(self) -> None:
        exposure = self.exposure
        if exposure.is_open:
            await exposure.enter()
            return
        self._m.calls_waiting.inc()
        try:
            await exposure.enter()
        finally:
            self._m.calls_waiting.dec()

    def _dead(
        self,
        record: InputRecord,
        exc: EventRejected,
        event_id: str | None = None,
        correlation_id: str | None = None,
        app: str = "",
    ) -> Outcome:
        log.warning(
            "event dead-lettered",
            extra={
                "event_id": event_id,
                "correlation_id": correlation_id,
                "stage": exc.stage.value,
                "code": exc.code,
                "reason": exc.reason,
                "source": f"{record.topic}/{record.partition}/{record.offset}",
            },
        )
        dlq = dead_letter_record(self._s.kafka.dead_letter_topic, record, exc, event_id=event_id)
        spans: tuple[Any, ...] = ()
        if TRACING.on:
            publish = TRACING.publish_span(self._s.kafka.dead_letter_topic, "dead_letter")
            dlq = TRACING.with_trace_headers(dlq, publish)
            spans = (publish,)
        mark = self._store.remember_dead_letter(record.tp, record.offset)
        records = (dlq,) if mark is None else (dlq, mark)
        return Outcome(
            record.tp,
            record.offset,
            records,
            "dead_letter",
            stage=exc.stage.value,
            code=exc.code,
            spans=spans,
            app=app,
        )

    # -- revocation and drain -----------------------------------------------------------

    async def abandon(self, tps: Iterable[TopicPartitionKey], timeout_s: float) -> int:
        """Stop the partitions' jobs: cancel those waiting, let HTTP attempts finish up to
        ``timeout_s`` (then cancel them too). Returns the number of jobs cut short."""
        jobs = [job for tp in tps for job in self._jobs.get(tp, ())]
        for job in jobs:
            job.abandoned = True
            if not job.calling and job.task is not None:
                job.task.cancel()
        tasks = [job.task for job in jobs if job.task is not None and not job.task.done()]
        if not tasks:
            return 0
        _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%d API calls still running at the deadline were cancelled; their events "
                "will be replayed and may create a second thread",
                len(pending),
            )
            await asyncio.wait(pending)
        return len(pending)

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Drop revoked partitions' offsets and jobs. Their dedup entries are the
        connector's to drop: they stay valid if the partitions come straight back."""
        tps = list(tps)
        for tp in tps:
            self.tracker.drop(tp)
            self._jobs.pop(tp, None)
        gone = set(tps)
        self._key_tails = {k: v for k, v in self._key_tails.items() if k[0] not in gone}
        # an outcome left for a partition no longer ours is the next owner's to replay:
        # published, it would be a result no offset of ours commits (a duplicate)
        self._outcomes = [o for o in self._outcomes if o.tp not in gone]

    # -- commit -------------------------------------------------------------------------

    async def commit(self, sink: Sink) -> int:
        """One commit cycle; returns the number of outcomes made durable."""
        async with self._commit_lock:
            if self._failed is not None:
                # the failed cycle's ``finish`` counted its outcomes done, and they are gone:
                # a later cycle would commit positions past events with no durable outcome
                raise CommitError(
                    f"an earlier commit cycle of this session failed ({self._failed}); "
                    "the session restarts from the committed offsets"
                )
            outcomes, self._outcomes = self._outcomes, []
            tracker = self.tracker
            exposure = self.exposure
            # after a failed cycle calls wait for one that succeeds: with nothing new to
            # commit, re-commit the positions already committed to ask the broker
            probe = {} if exposure.healthy else tracker.committed_positions()
            if not outcomes and not tracker.uncommitted() and not probe:
                return 0
            records = [r for o in outcomes for r in o.records]
            records.extend(self._store.take_tombstones())

            def finish() -> dict[TopicPartitionKey, int]:
                for outcome in outcomes:
                    tracker.done(outcome.tp, outcome.offset)
                positions = tracker.uncommitted() or probe
                if not positions and records and sink.mode == "transaction":
                    # the broker checks that we are still the partitions' owner (KIP-447,
                    # ``fencing``) only on the offsets in a transaction: records whose
                    # positions did not move (behind a gap) go with the positions already
                    # committed, or a zombie's transaction would commit them unchecked
                    positions = tracker.committed_positions()
                return positions

            started = time.monotonic()
            exposure.cycle_started()
            try:
                positions = await sink.commit_cycle(records, finish)
            except BaseException as exc:
                self._failed = exc
                exposure.cycle_failed()
                self._m.commit_failures.labels(sink.mode).inc()
                if TRACING.on:
                    TRACING.end_publish((sp for o in outcomes for sp in o.spans), exc)
                raise
            if TRACING.on:
                TRACING.end_publish(sp for o in outcomes for sp in o.spans)
            exposure.cycle_succeeded(sum(1 for o in outcomes if o.kind == "result"))
            tracker.mark_committed(positions)
            self._store.prune(positions)
            self._m.commit_duration.labels(sink.mode).observe(time.monotonic() - started)
            self._count(outcomes)
            return len(outcomes)

    def _count(self, outcomes: list[Outcome]) -> None:
        now_ms = time.time() * 1000
        m = self._m
        for o in outcomes:
            if o.kind == "result":
                self.stats.results += 1
                m.results_published.inc()
                if o.event_ts_ms > 0:
                    m.end_to_end_latency.observe(max(0.0, (now_ms - o.event_ts_ms) / 1000))
            elif o.kind == "dead_letter":
                self.stats.dead_letters += 1
                m.dead_letters.labels(o.stage, o.code, o.app, o.tp[0]).inc()
            else:
                self.stats.duplicates += 1
