"""``connector dlq inspect``: what is in the dead-letter topic, by stage, code and day, and
the records themselves with their headers (shown safely: truncated, binary escaped)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from connector.config import ConnectorSettings
from connector.dlq.reader import DeadLetterReader
from connector.dlq.records import DeadLetter, Filter, iso_ms, safe_text


@dataclass
class Group:
    """Dead letters of one (stage, code, UTC day)."""

    count: int = 0
    oldest_ms: int = 0
    newest_ms: int = 0

    def add(self, at_ms: int) -> None:
        self.oldest_ms = at_ms if self.count == 0 else min(self.oldest_ms, at_ms)
        self.newest_ms = max(self.newest_ms, at_ms)
        self.count += 1


@dataclass
class Summary:
    """Counts of the matching dead letters, and the ``show`` most recent of them."""

    topic: str
    show: int = 0
    total: int = 0
    scanned: int = 0
    groups: dict[tuple[str, str, str], Group] = field(default_factory=dict)
    _recent: list[tuple[int, int, int, DeadLetter]] = field(default_factory=list)

    def add(self, dl: DeadLetter) -> None:
        self.total += 1
        day = iso_ms(dl.failed_at_ms)[:10]
        self.groups.setdefault((dl.stage, dl.code, day), Group()).add(dl.failed_at_ms)
        if self.show > 0:
            item = (dl.failed_at_ms, dl.partition, dl.offset, dl)
            if len(self._recent) < self.show:
                heapq.heappush(self._recent, item)
            elif item[:3] > self._recent[0][:3]:
                heapq.heapreplace(self._recent, item)

    def recent(self) -> list[DeadLetter]:
        """The ``show`` most recent matching dead letters, oldest first."""
        return [item[3] for item in sorted(self._recent, key=lambda i: i[:3])]


async def inspect(settings: ConnectorSettings, flt: Filter, show: int = 0) -> Summary:
    """Read the whole dead-letter topic (read_committed) and summarise what matches."""
    async with DeadLetterReader(settings) as reader:
        summary = Summary(reader.topic, show)
        async for dl in reader.read({}):
            summary.scanned += 1
            if flt.matches(dl):
                summary.add(dl)
    return summary


def record_json(dl: DeadLetter, max_bytes: int) -> dict[str, Any]:
    key, key_cut = safe_text(dl.key, max_bytes)
    value, value_cut = safe_text(dl.value, max_bytes)
    return {
        "coordinates": dl.coordinates,
        "failedAt": iso_ms(dl.failed_at_ms),
        "stage": dl.stage,
        "code": dl.code,
        "reason": safe_text(dl.reason.encode(), max_bytes)[0],
        "eventId": dl.event_id,
        "eventType": dl.event_type,
        "source": str(dl.source) if dl.source else None,
        "redriveCount": dl.redrive_count,
        "key": key,
        "keyTruncated": key_cut,
        "value": value,
        "valueBytes": len(dl.value) if dl.value is not None else None,
        "valueTruncated": value_cut,
        "headers": [
            [safe_text(k.encode(), 100)[0], safe_text(v, max_bytes)[0]] for k, v in dl.headers
        ],
    }


def summary_json(summary: Summary, flt: Filter, max_bytes: int) -> dict[str, Any]:
    return {
        "topic": summary.topic,
        "filter": flt.describe(),
        "scanned": summary.scanned,
        "total": summary.total,
        "groups": [
            {
                "stage": stage,
                "code": code,
                "day": day,
                "count": g.count,
                "oldest": iso_ms(g.oldest_ms),
                "newest": iso_ms(g.newest_ms),
            }
            for (stage, code, day), g in sorted(summary.groups.items())
        ],
        "records": [record_json(dl, max_bytes) for dl in summary.recent()],
    }


def summary_text(summary: Summary, max_bytes: int) -> str:
    lines = [
        f"{summary.topic}: {summary.total} dead letter(s) match"
        f" ({summary.scanned} read, read_committed)"
    ]
    if summary.groups:
        lines.append(f"  {'stage':<9} {'code':<22} {'day':<10} {'count':>7}  oldest    newest")
        for (stage, code, day), g in sorted(summary.groups.items()):
            lines.append(
                f"  {stage:<9} {code:<22} {day:<10} {g.count:>7}  "
                f"{iso_ms(g.oldest_ms)[11:19]}  {iso_ms(g.newest_ms)[11:19]}"
            )
    for dl in summary.recent():
        lines.extend(_record_lines(dl, max_bytes))
    return "\n".join(lines) + "\n"


def _record_lines(dl: DeadLetter, max_bytes: int) -> list[str]:
    r = record_json(dl, max_bytes)
    size = "null" if r["valueBytes"] is None else f"{r['valueBytes']} B"
    return [
        "",
        f"{r['coordinates']}  failed {r['failedAt']}  {r['stage']}/{r['code']}"
        f"  event {r['eventId'] or '-'}  type {r['eventType'] or '-'}"
        f"  redriven {r['redriveCount']}x",
        f"  source: {r['source'] or '-'}  reason: {r['reason']}",
        f"  key: {r['key']}{' …' if r['keyTruncated'] else ''}",
        f"  value ({size}): {r['value']}{' …' if r['valueTruncated'] else ''}",
        "  headers: " + ", ".join(f"{k}={v}" for k, v in r["headers"]),
    ]
