"""The sink's partitioner gives what Kafka's default partitioner gives (aiokafka's, which
follows the Java client's ``Utils.murmur2``)."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference

from connector.partitioning import murmur2, partition_for


def test_murmur2_equals_the_reference_on_every_length_and_random_bytes() -> None:
    rng = random.Random(7)
    for length in [*range(0, 70), 255, 1_000, 4_097]:
        for _ in range(40):
            data = rng.randbytes(length)
            assert murmur2(data) == reference(data), length


def test_known_values_of_the_java_client() -> None:
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in cases.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data


def test_partition_for_a_key_equals_the_default_partitioners() -> None:
    rng = random.Random(11)
    default = DefaultPartitioner()
    for count in (1, 2, 3, 6, 7, 64):
        partitions = list(range(count))
        for _ in range(300):
            key = f"user-{rng.randrange(10**9)}".encode()
            assert partition_for(key, partitions) == default(key, partitions, partitions)


def test_a_record_without_a_key_goes_to_any_partition() -> None:
    seen = {partition_for(None, [0, 1, 2]) for _ in range(300)}
    assert seen == {0, 1, 2}
