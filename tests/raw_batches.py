"""Record batches as a careless producer can write them, sent to the broker unchanged.

aiokafka's producer encodes header names from ``str``, so it cannot write a name that is
not UTF-8; the broker accepts one. ``batch`` builds a v2 batch with aiokafka's own builder,
then puts raw bytes where a placeholder name was and computes the CRC again; ``send_raw``
sends it in a ProduceRequest of our own.
"""

from __future__ import annotations

import struct

from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.util import calc_crc32c

ATTRIBUTES_OFFSET = struct.calcsize(">qiibI")
CRC_OFFSET = struct.calcsize(">qiib")
Raw = tuple[bytes | None, bytes | None, list[tuple[bytes, bytes]]]


def batch(
    records: list[Raw],
    *,
    codec: int = 0,
    bad_crc: bool = False,
    base_offset: int = 0,
    producer_id: int = -1,
) -> bytes:
    """One v2 batch of ``records`` (key, value, headers with raw ``bytes`` names).
    ``codec``: written in the attributes as it is (5-7 are codecs no client knows; the
    records stay uncompressed). ``bad_crc``: a CRC that does not match. ``producer_id``
    other than -1: a transactional batch of that producer."""
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=0,
        is_transactional=int(producer_id != -1),
        producer_id=producer_id,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=16 * 1024 * 1024,
    )
    swaps: list[tuple[bytes, bytes]] = []
    for i, (key, value, headers) in enumerate(records):
        named: list[tuple[str, bytes | None]] = []
        for j, (name, header_value) in enumerate(headers):
            try:
                named.append((name.decode("utf-8"), header_value))
                continue
            except UnicodeDecodeError:
                pass
            placeholder = f"#{i:05d}-{j:05d}#"
            if len(name) < len(placeholder):
                raise ValueError(f"a non-UTF-8 header name needs {len(placeholder)}+ bytes here")
            placeholder = placeholder.ljust(len(name), "#")
            swaps.append((placeholder.encode(), name))
            named.append((placeholder, header_value))
        builder.append(i, timestamp=None, key=key, value=value, headers=named)
    data = bytearray(builder.build())
    for placeholder, name in swaps:
        at = data.index(placeholder)
        data[at : at + len(name)] = name
    if codec:
        (attributes,) = struct.unpack_from(">h", data, ATTRIBUTES_OFFSET)
        struct.pack_into(">h", data, ATTRIBUTES_OFFSET, (attributes & ~0x07) | codec)
    crc = calc_crc32c(bytes(data[ATTRIBUTES_OFFSET:]))
    struct.pack_into(">I", data, CRC_OFFSET, crc ^ 1 if bad_crc else crc)
    struct.pack_into(">q", data, 0, base_offset)  # not under the CRC
    return bytes(data)


async def send_raw(bootstrap: str, tp: TopicPartition, data: bytes) -> None:
    """Write the batch to the partition's leader as it is (acks=all)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(tp)
        if leader is None:
            raise RuntimeError(f"no leader for {tp}")
        request = ProduceRequest(None, -1, 30_000, [(tp.topic, [(tp.partition, data)])])
        response = await client.send(leader, request)
        for _topic, partitions in response.topics:
            for partition in partitions:
                error = for_code(partition[1])
                if partition[1] != 0:
                    raise error(f"produce to {tp} refused")
    finally:
        await client.close()
