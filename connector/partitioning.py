"""Kafka's default partitioner for keyed records, as the Java client computes it.

The sink builds each partition's batch itself (``Sink``), so it picks partitions itself:
``murmur2(key) & 0x7fffffff % partitions``, as Java's ``BuiltInPartitioner`` and aiokafka's
``DefaultPartitioner`` do, so that a user's results land where any other client would put
them. aiokafka's ``murmur2`` is pure Python, reading the key a byte at a time; this one
reads it four bytes at a time (``struct``) and takes about half the time (2.6 against
4.6 µs for a 23-byte key). ``tests/test_partitioning.py`` checks both agree.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned."""
    length = len(data)
    m, mask = _M, _MASK
    h = _SEED ^ length
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def partition_for(
    key: bytes | None, partitions: Sequence[int], available: Sequence[int] = ()
) -> int:
    """The partition of a record with ``key`` among ``partitions`` (sorted); a record
    without a key goes to one at random among ``available`` (those with a leader) if any,
    as aiokafka's default partitioner sends it."""
    if key is None:
        return random.choice(available or partitions)
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
