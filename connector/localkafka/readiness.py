"""Is the broker ready? Metadata and coordinator probes with aiokafka on a private loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

_T = TypeVar("_T")


async def _describe_cluster(bootstrap: str, timeout_s: float) -> int:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), retry_backoff_ms=50
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            info = await admin.describe_cluster()
    finally:
        await admin.close()
    return len(info.get("brokers") or [])


async def _warm_coordinators(bootstrap: str, timeout_s: float) -> None:
    """Until the group and transaction coordinators answer (creating their internal
    topics), so the first consumer group or transactional producer of a test need not
    wait out COORDINATOR_NOT_AVAILABLE."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            for step in ("group", "offsets", "transaction"):
                while True:
                    try:
                        if step == "offsets":
                            await admin.list_consumer_group_offsets(_WARMUP_KEY)
                        else:
                            await admin.find_coordinator(_WARMUP_KEY, int(step == "transaction"))
                        break
                    except KafkaError as exc:
                        if not exc.retriable:
                            raise
                        await asyncio.sleep(0.05)
    finally:
        await admin.close()


_WARMUP_KEY = "localkafka-warmup"


def _in_private_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    with ThreadPoolExecutor(1, thread_name_prefix="localkafka-probe") as pool:
        return pool.submit(asyncio.run, coro).result()


def metadata_broker_count(bootstrap: str, timeout_s: float = 5.0) -> int:
    """Brokers listed in a Kafka metadata response from ``bootstrap``.

    Runs aiokafka on a private event loop in a worker thread, so it also works when called
    from code that is itself running inside an event loop.
    """
    return _in_private_loop(_describe_cluster(bootstrap, timeout_s))
