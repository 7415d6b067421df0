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

from connector.apps import Apps
from connector.calls import Abandoned, ThreadCaller
from connector.config import ConnectorSettings, Ordering
from connector.dedup import DedupStore, InFlight, Seen
from connector.errors import EventRejected
from connector.events import (
    Event,
    InputRecord,
    OutRecord,
    TopicPartitionKey,
    dead_letter_record,
    parse_event,
    result_record,
)
from connector.metrics import Metrics
from connector.offsets import OffsetTracker
from connector.routing import Router, render
from connector.sink import Sink

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
    ) -> None:
        self._s = settings
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
        record = job.record
        try:
            outcome = await self._handle(job)
        except (Abandoned, asyncio.CancelledError):
            self.stats.abandoned += 1
            return  # offset stays uncommitted: the partition's next owner replays it
        finally:
            self._finish_turn(job)
            jobs = self._jobs.get(record.tp)
            if jobs is not None:
                jobs.discard(job)
        self._outcomes.append(outcome)

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
        s = self._s
        try:
            event = parse_event(
                record,
                id_field=s.dedup.event_id_field,
                id_header=s.dedup.event_id_header,
                type_field=s.event_type_field,
            )
        except EventRejected as exc:
            return self._dead(record, exc)
        if self._store.seen(record.tp, event.event_id) is not None:
            self._m.dedup_hits.labels(record.topic, "window").inc()
            return Outcome(record.tp, record.offset)
        waiter = self._inflight.claim(record.tp, event.event_id)
        if waiter is not None:
            await waiter  # the first copy's call: one call for both
            self._m.dedup_hits.labels(record.topic, "in_flight").inc()
            return Outcome(record.tp, record.offset)
        try:
            return await self._call(job, event)
        finally:
            self._inflight.release(record.tp, event.event_id)

    async def _call(self, job: Job, event: Event) -> Outcome:
        record = job.record
        try:
            route, request = self._router.build(event)
        except EventRejected as exc:
            return self._dead(record, exc, event.event_id, event.correlation_id)
        if job.previous is not None:
            await job.previous
        try:
            created = await self._caller.call(
                request, event.event_id, event.correlation_id, guard=job
            )
        except EventRejected as exc:
            return self._dead(record, exc, event.event_id, event.correlation_id)
        values = {
            "threadUid": created.thread_uid,
            "humanUid": created.human_uid,
            "agentUid": created.agent_uid,
            "appUid": route.app_uid,
            "eventId": event.event_id,
        }
        deep_link = render(self._s.results.deep_link_template, event.body, values)
        records = [
            result_record(
                self._s.kafka.results_topic,
                event,
                app_uid=route.app_uid,
                created=created,
                deep_link=deep_link,
                user_key=request.user_key,
            )
        ]
        changelog = self._store.remember(
            record.tp, Seen(event.event_id, self._store.window.now(), created.thread_uid)
        )
        if changelog is not None:
            records.append(changelog)
        self._m.threads_created.labels(record.topic, route.app_uid).inc()
        log.info(
            "thread created",
            extra={
                "event_id": event.event_id,
                "correlation_id": event.correlation_id,
                "thread_uid": created.thread_uid,
                "attempts": created.attempts,
            },
        )
        return Outcome(record.tp, record.offset, tuple(records), "result", record.timestamp_ms)

    def _dead(
        self,
        record: InputRecord,
        exc: EventRejected,
        event_id: str | None = None,
        correlation_id: str | None = None,
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
        return Outcome(
            record.tp, record.offset, (dlq,), "dead_letter", stage=exc.stage.value, code=exc.code
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

    # -- commit -------------------------------------------------------------------------

    async def commit(self, sink: Sink) -> int:
        """One commit cycle; returns the number of outcomes made durable."""
        async with self._commit_lock:
            outcomes, self._outcomes = self._outcomes, []
            if not outcomes and not self.tracker.uncommitted():
                return 0
            records = [r for o in outcomes for r in o.records]
            tracker = self.tracker

            def finish() -> dict[TopicPartitionKey, int]:
                for outcome in outcomes:
                    tracker.done(outcome.tp, outcome.offset)
                return tracker.uncommitted()

            started = time.monotonic()
            try:
                positions = await sink.commit_cycle(records, finish)
            except BaseException:
                self._m.commit_failures.labels(sink.mode).inc()
                raise
            tracker.mark_committed(positions)
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
                m.dead_letters.labels(o.stage, o.code).inc()
            else:
                self.stats.duplicates += 1
