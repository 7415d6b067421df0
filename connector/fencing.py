"""Group fencing for exactly-once (KIP-447) on aiokafka, which does not implement it.

A member paused past its session timeout (a GC pause, a frozen node, SIGSTOP) is removed
from the group, and its partitions go to others. When it wakes up it is a *zombie*: it
still holds a transaction with results for partitions it no longer owns. Two requests make
the broker refuse it, and keep the new owner from starting under it:

- **TxnOffsetCommit v3** carries the consumer's ``generation_id``, ``member_id`` and
  ``group_instance_id``. The group coordinator refuses offsets from a member that is not in
  the current generation (``ILLEGAL_GENERATION``, ``UNKNOWN_MEMBER_ID``,
  ``FENCED_INSTANCE_ID``): the transaction is then aborted (its results with it) and the
  error surfaces as :class:`StaleMemberError`, which the sink turns into a fence (the
  session restarts from the committed offsets). aiokafka sends v0, without the member.
- **OffsetFetch v7** with ``require_stable``: while a transaction holding offsets for a
  partition is open, the broker answers ``UNSTABLE_OFFSET_COMMIT`` instead of the last
  committed offset, and the fetch is retried until the transaction ends. A new owner then
  never starts from an offset a pending (zombie's) transaction is about to move. aiokafka
  sends v1-v3, without the flag.

The member is the one the consumer had when it was *assigned* its partitions (captured by
``Source`` in the assignment hook), not aiokafka's live value: aiokafka resets that to
generation -1 and an empty member id when a heartbeat learns it was removed, and a commit
sent with those would be accepted as one from an old client (no check at all).

Both requests are defined in ``connector.kip447``. They reach aiokafka through two instance
attributes, set right after a client is built and before it is used:

- ``producer._sender._do_txn_offset_commit`` (one attempt; the sender repeats it while the
  offsets are pending), built on aiokafka's ``TxnOffsetCommitHandler`` for the retries and
  error handling of every other error code;
- ``consumer._coordinator._do_fetch_commit_offsets`` (used both for the positions of a new
  assignment and for ``consumer.committed``).

``check_aiokafka()`` verifies that what is reached into is there, with the signatures
relied on; it runs when a client is patched (and in ``tests/test_fencing.py``), so an
aiokafka release that moves them fails loudly instead of silently dropping the fencing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiokafka
from aiokafka import errors as kafka_errors
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import GroupAuthorizationFailedError, KafkaError
from aiokafka.producer.sender import Sender, TxnOffsetCommitHandler
from aiokafka.producer.transaction_manager import TransactionManager
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from connector.errors import FencedError
from connector.kip447 import (
    UNKNOWN_OFFSET,
    UNSTABLE_OFFSET_COMMIT,
    GroupMember,
    Versioned,
    as_v0,
    offset_fetch_request,
    stale_member,
    subclass,
    txn_offset_commit_request,
)

log = logging.getLogger(__name__)

AIOKAFKA_TESTED = ("0.13", "0.14")  # the versions pyproject allows, checked by check_aiokafka

MemberSource = Callable[[], GroupMember | None]


class StaleMemberError(FencedError):
    """The group coordinator refused our transactional offsets: this member is not in the
    group's current generation any more (its partitions belong to others). The transaction
    is aborted; the session restarts from the committed offsets."""


# A partition's committed offset is held by a transaction still open: aiokafka retries a
# ``retriable`` KafkaError after its backoff
UnstableOffsetError = subclass(KafkaError, "UnstableOffsetError", retriable=True)


# -- the producer side: TxnOffsetCommit with the member ------------------------------------


def fence_producer(producer: Any, member: MemberSource) -> None:
    """Make ``producer`` (transactional, not started yet) send its transactional offsets as
    TxnOffsetCommit v3 with the consumer's ``member()``."""
    check_aiokafka()
    sender = producer._sender

    async def do_txn_offset_commit(offsets: dict[TopicPartition, Any], group_id: str) -> None:
        # Sender._do_txn_offset_commit of aiokafka 0.14, with the request and the response
        # of version 3: one attempt, repeated by the sender while the offsets are pending
        if not offsets:
            return
        manager = sender._txn_manager
        current = member()
        if current is None or current.generation_id < 0 or not current.member_id:
            # never sent without the member: the broker would skip the check altogether
            _refuse(
                manager,
                StaleMemberError(f"no current group membership to commit offsets as ({current})"),
            )
            return
        try:
            node_id = await sender._find_coordinator(
                aiokafka.producer.sender.CoordinationType.GROUP, group_id
            )
        except GroupAuthorizationFailedError as exc:
            manager.error_transaction(exc)
            return
        handler = TxnOffsetCommitHandler(sender, offsets, group_id)
        base_handle = handler.handle_response

        def create_request() -> Versioned:
            return txn_offset_commit_request(
                manager.transactional_id,
                group_id,
                manager.producer_id,
                manager.producer_epoch,
                current,
                offsets,
            )

        def handle_response(response: Any) -> Any:
            refused = stale_member(response)
            if refused is None:
                return base_handle(as_v0(response))
            topic, partition, name = refused
            _refuse(
                manager,
                StaleMemberError(
                    f"the group coordinator refused our offsets ({name} for {topic}/{partition}"
                    f"): member {current.member_id} of generation {current.generation_id} is "
                    f"no longer in the group"
                ),
            )
            return None

        handler.create_request = create_request
        handler.handle_response = handle_response
        await handler.do(node_id)

    sender._do_txn_offset_commit = do_txn_offset_commit


def _refuse(manager: Any, exc: StaleMemberError) -> None:
    """Fail the transaction (abortable: it can no longer commit), and
    ``send_offsets_to_transaction`` raises ``exc``.

    aiokafka's ``error_transaction`` also forgets the partitions and the group the
    transaction holds, and its abort then sends no EndTxn for a transaction it thinks is
    empty: the zombie's records stayed open on the broker until ``transaction.timeout.ms``,
    holding every reader of those partitions (read_committed) that long. They are kept, so
    the abort ends the transaction at once."""
    partitions, group = set(manager._txn_partitions), manager._txn_consumer_group
    manager.error_transaction(exc)
    manager._txn_partitions.update(partitions)
    manager._txn_consumer_group = group
    # the transaction's waiter holds it too: retrieved here, or asyncio logs it at GC
    manager.wait_for_transaction_end().exception()


# -- the consumer side: OffsetFetch with require_stable --------------------------------------


def require_stable(consumer: Any) -> None:
    """Make ``consumer`` (started, not subscribed yet) fetch committed offsets with
    ``require_stable``, retrying while a transaction holds them."""
    check_aiokafka()
    coordinator = consumer._coordinator
    waiting: dict[TopicPartition, float] = {}  # partitions held by a pending transaction

    async def do_fetch_commit_offsets(
        partitions: Iterable[TopicPartition],
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        # GroupCoordinator._do_fetch_commit_offsets of aiokafka 0.14, version 7
        partitions = list(partitions)
        response = await coordinator._send_req(
            offset_fetch_request(coordinator.group_id, partitions)
        )
        _raise_group_error(coordinator, response.error_code)
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        unstable: list[TopicPartition] = []
        for topic, topic_partitions, _ in response.topics:
            for partition, offset, _epoch, metadata, code, _ in topic_partitions:
                tp = TopicPartition(topic, partition)
                if code == UNSTABLE_OFFSET_COMMIT:
                    unstable.append(tp)
                    continue
                _raise_partition_error(coordinator, tp, code)
                if offset != UNKNOWN_OFFSET:
                    offsets[tp] = OffsetAndMetadata(offset, metadata or "")
        now = time.monotonic()
        if unstable:
            new = [tp for tp in unstable if tp not in waiting]
            for tp in new:
                waiting[tp] = now
            if new:
                log.info(
                    "committed offsets of %s are held by a transaction still open (a former "
                    "owner's?): waiting for it to end",
                    ", ".join(f"{tp.topic}/{tp.partition}" for tp in new),
                )
            raise UnstableOffsetError(f"{len(unstable)} partition(s) with pending offsets")
        settled = [tp for tp in partitions if tp in waiting]
        if settled:
            since = min(waiting.pop(tp) for tp in settled)
            log.info(
                "committed offsets of %s settled after %.1fs",
                ", ".join(f"{tp.topic}/{tp.partition}" for tp in settled),
                now - since,
            )
        return offsets

    coordinator._do_fetch_commit_offsets = do_fetch_commit_offsets


def _raise_group_error(coordinator: Any, code: int) -> None:
    if code == 0:
        return
    error = kafka_errors.for_code(code)
    if error is kafka_errors.NotCoordinatorForGroupError:
        coordinator.coordinator_dead()
    if error is GroupAuthorizationFailedError:
        raise error(coordinator.group_id)
    raise error()


def _raise_partition_error(coordinator: Any, tp: TopicPartition, code: int) -> None:
    """As aiokafka's handler: retry, find the coordinator again, skip or stop."""
    if code == 0:
        return
    error = kafka_errors.for_code(code)
    if error is kafka_errors.UnknownTopicOrPartitionError:
        log.warning("OffsetFetch: unknown topic %s", tp.topic)
        return
    _raise_group_error(coordinator, code)


# -- what is reached into -------------------------------------------------------------------

_REACHED = (
    (Sender, "_do_txn_offset_commit", ["self", "offsets", "group_id"]),
    (Sender, "_find_coordinator", ["self", "coordinator_type", "coordinator_key"]),
    (TransactionManager, "error_transaction", ["self", "exc"]),
    (TransactionManager, "wait_for_transaction_end", ["self"]),
    (TxnOffsetCommitHandler, "__init__", ["self", "sender", "offsets", "group_id"]),
    (TxnOffsetCommitHandler, "handle_response", ["self", "resp"]),
    (TxnOffsetCommitHandler, "do", ["self", "node_id"]),
    (GroupCoordinator, "_do_fetch_commit_offsets", ["self", "partitions"]),
    (GroupCoordinator, "_send_req", ["self", "request"]),
    (GroupCoordinator, "coordinator_dead", ["self"]),
)
_checked = False


def check_aiokafka() -> None:
    """Fail loudly when aiokafka's internals this module replaces or calls have moved."""
    global _checked
    if _checked:
        return
    version = aiokafka.__version__
    problems = []
    if not version.startswith(AIOKAFKA_TESTED):
        problems.append(f"aiokafka {version} is not one of {AIOKAFKA_TESTED}")
    manager = inspect.getsource(TransactionManager)
    for attribute in ("self._txn_partitions", "self._txn_consumer_group"):
        if attribute not in manager:
            problems.append(f"TransactionManager has no {attribute}")
    for owner, name, params in _REACHED:
        found = getattr(owner, name, None)
        if found is None:
            problems.append(f"{owner.__name__}.{name} is gone")
        elif list(inspect.signature(found).parameters) != params:
            problems.append(f"{owner.__name__}.{name} has changed: {inspect.signature(found)}")
    if problems:
        raise RuntimeError(
            "connector.fencing (KIP-447 on aiokafka) does not fit this aiokafka: "
            + "; ".join(problems)
        )
    _checked = True
