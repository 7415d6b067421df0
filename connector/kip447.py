"""Two Kafka requests aiokafka does not have, for KIP-447 (``connector.fencing`` uses them).

Defined from Kafka's message specs
(``clients/src/main/resources/common/message/{TxnOffsetCommit,OffsetFetch}{Request,Response}.json``)
with aiokafka's own protocol types, in their flexible versions (compact strings and arrays,
tagged fields after every struct):

- **TxnOffsetCommit v3**: a transaction's offsets with the consumer's ``generation_id``,
  ``member_id`` and ``group_instance_id`` (aiokafka sends v0, without them);
- **OffsetFetch v7** with ``require_stable`` (aiokafka sends v1-v3, without it).

Each is sent through aiokafka's connection as a :class:`Versioned`: one version only, and a
broker without it is refused by name (no silent fall back to a request without the
fencing).
"""

from __future__ import annotations

import collections
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.api import RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
STALE_MEMBER_CODES = {
    ILLEGAL_GENERATION: "ILLEGAL_GENERATION",
    UNKNOWN_MEMBER_ID: "UNKNOWN_MEMBER_ID",
    FENCED_INSTANCE_ID: "FENCED_INSTANCE_ID",
}
UNKNOWN_OFFSET = -1


@dataclass(frozen=True)
class GroupMember:
    """Who a consumer was in its group when it was assigned its partitions."""

    generation_id: int  # the group generation of the assignment
    member_id: str  # given by the group coordinator at JoinGroup
    group_instance_id: str | None  # static membership (``kafka.group_instance_id``)


def subclass(base: Any, name: str, **attrs: Any) -> Any:
    """A subclass of one of aiokafka's (untyped) classes."""
    return types.new_class(name, (base,), {}, lambda ns: ns.update(attrs))


# -- the request and response structs (Kafka's message specs, flexible versions) ---------

STRING = CompactString("utf-8")
TAGS = ("tags", TaggedFields)  # closes every struct of a flexible version


def per_topic(*partition_fields: Any) -> tuple[str, Any]:
    """The ``topics`` array: a name and its ``partitions`` (of ``partition_fields``)."""
    partitions = ("partitions", CompactArray(*partition_fields, TAGS))
    return ("topics", CompactArray(("name", STRING), partitions, TAGS))


def flexible_api(
    name: str, api_key: int, version: int, request: list[Any], response: list[Any]
) -> Any:
    """The request struct of one flexible version of an API, with its response type."""
    response_type = subclass(
        Response,
        f"{name}Response_v{version}",
        API_KEY=api_key,
        API_VERSION=version,
        SCHEMA=Schema(*response, TAGS),
    )
    return subclass(
        RequestStruct,
        f"{name}Request_v{version}",
        FLEXIBLE_VERSION=True,
        API_KEY=api_key,
        API_VERSION=version,
        RESPONSE_TYPE=response_type,
        SCHEMA=Schema(*request, TAGS),
    )


TxnOffsetCommitRequest_v3 = flexible_api(
    "TxnOffsetCommit",
    28,
    3,
    request=[
        ("transactional_id", STRING),
        ("group_id", STRING),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", STRING),
        ("group_instance_id", STRING),  # nullable
        per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("committed_metadata", STRING),  # nullable
        ),
    ],
    response=[
        ("throttle_time_ms", Int32),
        per_topic(("partition_index", Int32), ("error_code", Int16)),
    ],
)
TxnOffsetCommitResponse_v3 = TxnOffsetCommitRequest_v3.RESPONSE_TYPE

OffsetFetchRequest_v7 = flexible_api(
    "OffsetFetch",
    9,
    7,
    request=[
        ("group_id", STRING),
        (
            "topics",
            CompactArray(("name", STRING), ("partition_indexes", CompactArray(Int32)), TAGS),
        ),
        ("require_stable", Boolean),
    ],
    response=[
        ("throttle_time_ms", Int32),
        per_topic(
            ("partition_index", Int32),
            ("committed_offset", Int64),
            ("committed_leader_epoch", Int32),
            ("metadata", STRING),  # nullable
            ("error_code", Int16),
        ),
        ("error_code", Int16),
    ],
)
OffsetFetchResponse_v7 = OffsetFetchRequest_v7.RESPONSE_TYPE


class Versioned:
    """What aiokafka's connection needs of a request: ``prepare`` picks the struct for the
    broker's versions. One version only, and a broker without it is refused by name (no
    silent fall back to a request without the fencing)."""

    def __init__(self, struct: Any, *fields: Any) -> None:
        self.API_KEY: int = struct.API_KEY
        self._struct = struct
        self._fields = fields

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        low, high = versions.get(self.API_KEY, (0, -1))
        version = self._struct.API_VERSION
        if not low <= version <= high:
            raise IncompatibleBrokerVersion(
                f"exactly_once needs {self._struct.__name__} (Kafka 2.5 or later: KIP-447); "
                f"the broker supports api {self.API_KEY} versions {low}-{high}"
            )
        return self._struct(*self._fields)


def txn_offset_commit_request(
    transactional_id: str,
    group_id: str,
    producer_id: int,
    producer_epoch: int,
    member: GroupMember,
    offsets: dict[TopicPartition, OffsetAndMetadata],
) -> Versioned:
    no_tags: dict[int, bytes] = {}
    by_topic: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = (
        collections.defaultdict(list)
    )
    for tp, offset in sorted(offsets.items()):
        by_topic[tp.topic].append((tp.partition, offset.offset, -1, offset.metadata, no_tags))
    return Versioned(
        TxnOffsetCommitRequest_v3,
        transactional_id,
        group_id,
        producer_id,
        producer_epoch,
        member.generation_id,
        member.member_id,
        member.group_instance_id,
        [(topic, parts, no_tags) for topic, parts in by_topic.items()],
        no_tags,
    )


def offset_fetch_request(group_id: str, partitions: Iterable[TopicPartition]) -> Versioned:
    by_topic: dict[str, list[int]] = collections.defaultdict(list)
    for tp in partitions:
        by_topic[tp.topic].append(tp.partition)
    no_tags: dict[int, bytes] = {}
    topics = [(topic, sorted(parts), no_tags) for topic, parts in by_topic.items()]
    return Versioned(OffsetFetchRequest_v7, group_id, topics, True, no_tags)


def stale_member(response: Any) -> tuple[str, int, str] | None:
    """(topic, partition, error name) of the first partition refused for a stale member."""
    for topic, partitions, _ in response.topics:
        for partition, code, _ in partitions:
            if code in STALE_MEMBER_CODES:
                return topic, partition, STALE_MEMBER_CODES[code]
    return None


def as_v0(response: Any) -> Any:
    """A v3 response in the shape aiokafka's handler reads (``errors``: topic, partition
    and error code), for every code but the stale-member ones."""
    return types.SimpleNamespace(
        errors=[
            (topic, [(partition, code) for partition, code, _ in partitions])
            for topic, partitions, _ in response.topics
        ]
    )
