"""``connector dlq redrive``: copy dead letters back to the input topic they came from.

Each copy keeps the original record: key, value, headers (without the ``dlq-*`` ones),
partition (so it meets the same dedup partition as its duplicates) and timestamp (so a
route's ``max_event_age_s`` still sees the event's age). It gains ``dlq-redrive-count``
(one more than the dead letter carried) and ``dlq-redriven-from`` (the dead letter's
own topic/partition/offset). Dead-lettered events are not remembered by dedup, so the
connector processes the copies.

Copies are written in Kafka transactions (transactional id
``<delivery.transactional_id_prefix>-redrive-<group>``) that also commit the redrive's
position (``ledger``) for the consumer group ``<group>-redrive``: a crash or a second
redrive of the same group started meanwhile (which fences the first) rolls back the
last batch and its position together, and the connector, reading ``read_committed``,
never sees a rolled-back copy. Running a redrive twice copies nothing the second time;
``--again`` re-reads from the start and copies whatever matches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import OffsetAndMetadata

from connector.config import ConnectorSettings
from connector.dlq.ledger import PartitionLedger
from connector.dlq.plan import COPY, NOT_REDRIVABLE, Copy, Pacer, RedriveOptions, copy_of, decide
from connector.dlq.progress import Progress
from connector.dlq.reader import DeadLetterReader, DlqError
from connector.dlq.report import RedriveReport
from connector.kafka_common import client_kwargs
from connector.topics import TopicManager

log = logging.getLogger(__name__)
FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)


def redrive_group(settings: ConnectorSettings) -> str:
    return f"{settings.kafka.group_id}-redrive"


def redrive_transactional_id(settings: ConnectorSettings) -> str:
    return f"{settings.delivery.transactional_id_prefix}-redrive-{settings.kafka.group_id}"


async def redrive(
    settings: ConnectorSettings, opts: RedriveOptions, progress: Progress | None = None
) -> RedriveReport:
    """Run one redrive (see the module docstring); DlqError if Kafka refuses."""
    progress = progress or Progress(enabled=False)
    group = redrive_group(settings)
    report = RedriveReport(group, opts.dry_run, opts.again, opts.filter)
    producer = None
    if not opts.dry_run:
        producer = AIOKafkaProducer(
            **client_kwargs(settings),
            acks="all",
            enable_idempotence=True,
            transactional_id=redrive_transactional_id(settings),
        )
        try:
            await producer.start()  # fences an earlier redrive of this group still running
        except KafkaError as exc:
            await producer.stop()
            raise DlqError(f"cannot start the redrive's transactional producer: {exc}") from exc
    try:
        async with DeadLetterReader(settings) as reader:
            ledgers = await _load_ledgers(settings, group, reader)
            report.positions = ledgers
            await _run(settings, opts, reader, ledgers, producer, report, progress)
    finally:
        progress.close()
        if producer is not None:
            await producer.stop()
    return report


async def _load_ledgers(
    settings: ConnectorSettings, group: str, reader: DeadLetterReader
) -> dict[int, PartitionLedger]:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    tps = [TopicPartition(reader.topic, p) for p in reader.partitions]
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise DlqError(f"cannot reach Kafka to read the position of {group}: {exc}") from exc
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
                break
            except KafkaError as exc:  # coordinator loading / moving: retriable
                if not exc.retriable or time.monotonic() > deadline:
                    raise DlqError(f"cannot read the position of {group}: {exc}") from exc
                await asyncio.sleep(0.2)
    finally:
        await admin.close()
    ledgers: dict[int, PartitionLedger] = {}
    for p in reader.partitions:
        found = offsets.get(TopicPartition(reader.topic, p))
        ledger = (
            PartitionLedger.decode(found.offset, found.metadata or "")
            if found is not None
            else PartitionLedger()
        )
        ledger.prune_below(reader.log_start[p])
        ledgers[p] = ledger
    return ledgers


async def _run(
    settings: ConnectorSettings,
    opts: RedriveOptions,
    reader: DeadLetterReader,
    ledgers: dict[int, PartitionLedger],
    producer: AIOKafkaProducer | None,
    report: RedriveReport,
    progress: Progress,
) -> None:
    inputs = frozenset(settings.kafka.input_topics)
    partitions = await _input_partitions(settings, inputs)
    pacer = Pacer(opts.rate_per_s) if opts.rate_per_s else None
    batch = max(1, min(opts.batch_size, int(opts.rate_per_s or opts.batch_size)))
    starts: dict[int, int | None] = (
        {p: None for p in ledgers}
        if opts.again
        else {p: led.committed for p, led in ledgers.items()}
    )
    txn = _Transaction(producer, reader.topic, redrive_group(settings), ledgers, report)
    read_to = {p: max(start or 0, reader.log_start[p]) for p, start in starts.items()}
    progress.start(sum(max(0, reader.ends[p] - read_to[p]) for p in read_to))
    async for dl in reader.read(starts):
        report.scanned += 1
        ledger = ledgers[dl.partition]
        outcome = decide(dl, ledger.pending(dl.offset), opts, inputs, partitions)
        report.outcomes[outcome] += 1
        if outcome == NOT_REDRIVABLE:
            report.not_redrivable_codes[dl.code] += 1
        progress.advance(dl.offset + 1 - read_to[dl.partition], copied=outcome == COPY)
        read_to[dl.partition] = dl.offset + 1
        if outcome != COPY:
            ledger.record(dl.offset, copied=False)
            continue
        copy = copy_of(dl)
        report.copied_to[copy.topic] += 1
        if producer is None:
            report.planned.append(copy)
        else:
            if pacer is not None:
                await pacer.wait()
            await txn.send(copy)
        ledger.record(dl.offset, copied=True)
        if txn.size >= batch:
            await txn.commit()
    if producer is not None and report.scanned:
        await txn.commit()
    progress.close(finished=True)


async def _input_partitions(settings: ConnectorSettings, inputs: frozenset[str]) -> dict[str, int]:
    """The input topics' partition counts now (a deleted topic is absent: its dead letters
    are left, counted, instead of failing the redrive at the first copy)."""
    try:
        async with TopicManager(settings) as topics:
            return await topics.partitions(sorted(inputs))
    except KafkaError as exc:
        raise DlqError(f"cannot read the input topics' partitions: {exc}") from exc


class _Transaction:
    """The copies of one batch and the position that accounts for them, in one Kafka
    transaction."""

    def __init__(
        self,
        producer: AIOKafkaProducer | None,
        topic: str,
        group: str,
        ledgers: dict[int, PartitionLedger],
        report: RedriveReport,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._group = group
        self._ledgers = ledgers
        self._report = report
        self._futures: list[asyncio.Future[Any]] = []
        self._open = False
        self.size = 0

    async def send(self, copy: Copy) -> None:
        if self._producer is None:
            return
        try:
            await self._begin()
            self._futures.append(
                await self._producer.send(
                    copy.topic,
                    value=copy.value,
                    key=copy.key,
                    partition=copy.partition,
                    timestamp_ms=copy.timestamp_ms,
                    headers=list(copy.headers),
                )
            )
        except BaseException as exc:
            await self._fail(exc)
            raise
        self.size += 1

    async def commit(self) -> None:
        if self._producer is None:
            return
        offsets = {}
        for p, ledger in self._ledgers.items():
            self._report.forgotten_offsets += ledger.fit()
            offsets[TopicPartition(self._topic, p)] = OffsetAndMetadata(
                ledger.committed, ledger.metadata()
            )
        try:
            await self._begin()
            await asyncio.gather(*self._futures)
            await self._producer.send_offsets_to_transaction(offsets, self._group)
            await self._producer.commit_transaction()
        except BaseException as exc:
            await self._fail(exc)
            raise
        self._report.transactions += 1
        log.info("redrive: committed %d copies and the position", self.size)
        self._open, self.size, self._futures = False, 0, []

    async def _begin(self) -> None:
        if not self._open and self._producer is not None:
            await self._producer.begin_transaction()
            self._open = True

    async def _fail(self, exc: BaseException) -> None:
        # a fenced producer fails its pending sends with ProducerFenced and refuses the next
        # call (IllegalOperation): look at both, and retrieve every send's outcome
        causes = [exc, *_outcomes(self._futures)]
        self._futures = []
        fenced = next((c for c in causes if isinstance(c, FENCED)), None)
        if fenced is not None:
            exc = fenced
        if self._producer is not None and self._open and not isinstance(exc, FENCED):
            try:
                await self._producer.abort_transaction()
            except (KafkaError, AssertionError):
                log.warning("abort_transaction failed; the broker will time the transaction out")
        self._open = False
        if isinstance(exc, FENCED):
            raise DlqError(
                "another redrive of this group started and fenced this one; this one's "
                "last batch was rolled back with its position"
            ) from exc
        if isinstance(exc, KafkaError):
            raise DlqError(f"the redrive transaction failed and was rolled back: {exc}") from exc


def _outcomes(futures: list[asyncio.Future[Any]]) -> list[BaseException]:
    """The exceptions of the sends that failed (retrieved, so none goes unseen); a send not
    done yet gets a callback that retrieves it later."""
    found: list[BaseException] = []
    for future in futures:
        if not future.done():
            future.add_done_callback(_retrieve)
        elif not future.cancelled():
            error = future.exception()
            if error is not None:
                found.append(error)
    return found


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
