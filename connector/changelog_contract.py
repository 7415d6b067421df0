"""What a dedup changelog topic's configuration must be for dedup to hold (pure).

A changelog entry must outlive ``dedup.ttl_s``: a replay of an event within the window is
dropped only if its entry is still there when a replica restores the partition. So:

- ``cleanup.policy`` includes ``compact``: entries are keyed by event id and written once,
  so compaction only removes a record that a later record of the same key replaced (a
  dead-letter mark and its tombstone); without it the topic (and every restore) grows with
  every entry ever written.
- with ``delete`` in the policy, ``retention.ms`` is -1 or at least ``dedup.ttl_s`` (a
  segment is deleted once its newest record is older than ``retention.ms``: no entry goes
  before it is that old), and ``retention.bytes`` is -1 (deletion by size takes entries of
  any age).
- the partition count equals the input topic's (checked by ``connector.topics``).

Not checked, because they cannot lose an entry: ``min.compaction.lag.ms``,
``max.compaction.lag.ms``, ``delete.retention.ms`` (compaction never removes the latest
record of a key, and a dead-letter mark is superseded by its tombstone before the
tombstone itself can go), ``segment.ms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

POLICY = "cleanup.policy"
RETENTION_MS = "retention.ms"
RETENTION_BYTES = "retention.bytes"


@dataclass(frozen=True)
class Breach:
    """One setting of one changelog topic that breaks the dedup guarantee."""

    topic: str
    setting: str
    value: str
    wanted: str  # the value the connector sets when it may correct it
    why: str

    def __str__(self) -> str:
        return (
            f"dedup changelog {self.topic}: {self.setting}={self.value} {self.why} "
            f"(set {self.setting}={self.wanted})"
        )


def ttl_ms(ttl_s: float) -> int:
    return int(ttl_s * 1000)


def creation_config(ttl_s: float, max_request_size: int) -> dict[str, str]:
    """A new changelog's configuration: compacted, entries deleted once past the window."""
    return {
        POLICY: "compact,delete",
        RETENTION_MS: str(ttl_ms(ttl_s)),
        "max.message.bytes": str(max_request_size),
    }


def breaches(topic: str, config: Mapping[str, str], ttl_s: float) -> list[Breach]:
    """The settings of ``config`` (a topic's effective configuration) that break dedup.
    A setting that cannot be read is not judged."""
    found: list[Breach] = []
    raw_policy = config.get(POLICY)
    if raw_policy is None:
        return found
    policy = {p.strip() for p in raw_policy.split(",") if p.strip()}
    if "compact" not in policy:
        found.append(
            Breach(
                topic,
                POLICY,
                raw_policy,
                ",".join(sorted(policy | {"compact"})),
                "must include compact",
            )
        )
    if "delete" not in policy:
        return found
    window = ttl_ms(ttl_s)
    retention = _int(config.get(RETENTION_MS))
    if retention is not None and retention != -1 and retention < window:
        found.append(
            Breach(
                topic,
                RETENTION_MS,
                str(retention),
                str(window),
                f"deletes entries before dedup.ttl_s ({window} ms) ends: a replay after a "
                f"restart would create a second thread",
            )
        )
    size = _int(config.get(RETENTION_BYTES))
    if size is not None and size != -1:
        found.append(
            Breach(
                topic,
                RETENTION_BYTES,
                str(size),
                "-1",
                "deletes entries by size, whatever their age inside dedup.ttl_s",
            )
        )
    return found


def corrected(dynamic: Mapping[str, str], found: list[Breach]) -> dict[str, str]:
    """The topic's full set of topic-level overrides with the breaches corrected (an
    AlterConfigs request replaces every override, so the others must be sent again)."""
    config = dict(dynamic)
    for breach in found:
        config[breach.setting] = breach.wanted
    return config


def _int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None
