"""Composition root and lifecycle.

``Connector.run(stop)`` owns everything for the process: the health server, the HTTP
client, the topics, and a loop of *sessions* (``connector.session.Session``, a fresh object
for each consumer-group membership, with its consumer, producer, pipeline and per-membership
state); a fenced producer, a refused commit or a failed rebalance hook ends the session
without committing, and a new one starts from the committed offsets (what was not
committed is replayed and deduplicated).

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
from connector.dedup import Clock, DedupWindow
from connector.errors import FencedError, TopicError
from connector.exposure import Exposure
from connector.formats import Parser
from connector.health import HealthServer
from connector.kafka_common import (
    BootstrapNoise,
    OutageNoise,
    describe_failure,
    diagnose,
    needs_diagnosis,
)
from connector.metrics import Metrics
from connector.pipeline import Pipeline
from connector.progress import PartitionProgress
from connector.registry import SchemaRegistry
from connector.routing import Router
from connector.session import Session, cancel
from connector.startup_checks import StartupChecks
from connector.topics import TopicManager
from connector.tracing import TRACING

log = logging.getLogger(__name__)
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
        self.checks = StartupChecks(settings, self.apps)  # check-config --online's, at start
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
        # the current (or last) group membership; a new one for each (connector.session)
        self.session: Session | None = None
        self._joined = False
        self._heartbeat = time.monotonic()
        self._last_commit_ok = time.monotonic()
        self._evictions_reported = 0
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
        self.kafka_category = "kafka"  # kafka_problem's readiness category ("topic_missing")
        # set by the reachability probe while a session runs: aiokafka retries a lost broker
        # quietly for ever, and an idle pipeline's commit cycles need no broker
        self.kafka_unreachable: str | None = None
        # output topics a stuck commit cycle waits for (deleted with auto-create off): the
        # producer retries them silently and forever
        self.outputs_missing: list[str] | None = None
        # the dedup changelogs' configuration, re-checked while running
        self.changelogs = ChangelogWatch(settings, lambda: self.input_partitions)
        self.metrics.init_not_ready(lambda: self._not_ready()[0])

    @property
    def pipeline(self) -> Pipeline | None:
        """The current session's pipeline (None before the first session)."""
        return self.session.pipeline if self.session is not None else None

    # -- health -------------------------------------------------------------------------

    def _live(self) -> tuple[bool, str]:
        # a revoke may hold the fetch loop while calls under way finish: not a hang
        stale_s = max(LIVENESS_STALE_S, self.settings.delivery.revoke_timeout_s + 30)
        age = time.monotonic() - self._heartbeat
        return age < stale_s, f"loop heartbeat {age:.1f}s ago"

    # Called from the health server's own thread: read simple attributes only.

    def _ready(self) -> tuple[bool, str]:
        category, reason = self._not_ready()
        return category is None, reason

    def _not_ready(self) -> tuple[str | None, str]:
        """``(category, reason)``: the category (None when ready) is one of
        ``metrics.NOT_READY_REASONS``, the ``not_ready{reason}`` gauge's bounded label."""
        lost = self.kafka_unreachable
        if lost is not None:
            interval = self.settings.kafka.probe_interval_s
            return "kafka", f"kafka: {lost} (probed every {interval:g}s)"
        failed = self.checks.reason()  # a missing ACL: says more than the failure it causes
        if failed is not None:
            return failed
        problem = self.kafka_problem
        if problem is not None and not self._joined:
            attempt = f"(attempt {self.kafka_attempts}, retrying)"
            return self.kafka_category, f"kafka: {problem} {attempt}"
        paused = self.apps.pause()  # before joining too: the start-up probe's pauses
        if paused is not None:
            session = self.session
            if session is not None and session.fetch_paused:  # they hold every later offset
                category, reason = paused
                return category, (
                    f"{reason}; every partition stopped fetching: "
                    f"delivery.max_buffered_events ({self.settings.delivery.max_buffered_events})"
                    " fetched events wait behind the paused ones, other routes included"
                )
            return paused
        if not self._joined:
            return "joining", "not in the consumer group yet"
        changelog = self.changelogs.problem
        if changelog is not None:
            return "changelog", changelog
        registry = self.registry
        if registry is not None and registry.problem is not None:
            return "registry", registry.problem
        if self.outputs_missing:
            return "topic_missing", (
                f"kafka: output topic(s) {', '.join(self.outputs_missing)} do not exist; "
                f"commit cycles wait for them"
            )
        stuck = self.progress.summary
        if stuck is not None:
            return "partition_blocked", stuck
        age = time.monotonic() - self._last_commit_ok
        if age > max(60.0, self.settings.kafka.session_timeout_ms / 1000 * 2):
            return "commit_stalled", f"no successful commit cycle for {age:.0f}s"
        assigned = self.session.assigned if self.session is not None else []
        return None, f"{len(assigned)} partitions assigned"

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
            if s.api.startup_probe:  # before any event: a wrong path or key pauses its app
                self._background(stack, self.checks.probe_api(stop))
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
            self._background(stack, self._probe_kafka(stop))
            if s.kafka.startup_checks:  # the permissions (missing ACLs) named by /readyz
                self._background(stack, self.checks.check_kafka(stop))
            if s.dedup.store == "changelog":
                self._background(stack, self.changelogs.run(stop))
            while not stop.is_set():
                self.sessions += 1
                self.session = Session(self)
                try:
                    await self.session.run(stop)
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

    @staticmethod
    def _background(stack: AsyncExitStack, work: Awaitable[None]) -> None:
        """Run ``work`` until it ends or the connector stops (cancelled with ``stack``)."""
        task = asyncio.ensure_future(work)
        stack.push_async_callback(cancel, task)

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
                    await cancel(attempt)
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
        # a topic the connector may not create (an input, or create_topics false), an
        # unsound one, a changelog that breaks its contract
        self.kafka_category = exc.category if isinstance(exc, TopicError) else "kafka"
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

    def _new_exposure(self, *, healthy: bool) -> Exposure:
        d = self.settings.delivery
        return Exposure(d.max_uncommitted_threads, d.commit_stall_s, healthy=healthy)


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


async def _first_done(work: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Return when ``work`` is done or ``stop`` is set, whichever comes first."""
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
