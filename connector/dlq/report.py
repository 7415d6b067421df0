"""What a redrive did (or, dry, would do): counts by outcome, as text or JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from connector.dlq.ledger import PartitionLedger
from connector.dlq.plan import (
    ALREADY,
    COPY,
    FILTERED,
    MAX_REDRIVES,
    NO_PARTITION,
    NO_SOURCE,
    NOT_AN_INPUT,
    Copy,
)
from connector.dlq.records import Filter


@dataclass
class RedriveReport:
    group: str
    dry_run: bool
    again: bool
    filter: Filter
    scanned: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    not_redrivable_codes: Counter[str] = field(default_factory=Counter)
    copied_to: Counter[str] = field(default_factory=Counter)
    transactions: int = 0
    forgotten_offsets: int = 0
    planned: list[Copy] = field(default_factory=list)  # dry run: what would be sent
    positions: dict[int, PartitionLedger] = field(default_factory=dict)

    @property
    def copied(self) -> int:
        return self.outcomes[COPY]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "dryRun": self.dry_run,
            "again": self.again,
            "filter": self.filter.describe(),
            "scanned": self.scanned,
            ("wouldCopy" if self.dry_run else "copied"): self.copied,
            "copiedTo": dict(self.copied_to),
            "outcomes": dict(self.outcomes),
            "notRedrivableCodes": dict(self.not_redrivable_codes),
            "transactions": self.transactions,
            "forgottenOffsets": self.forgotten_offsets,
            "positions": {
                str(p): {
                    "committed": led.committed,
                    "end": led.end,
                    "skippedRanges": len(led.skipped),
                }
                for p, led in sorted(self.positions.items())
            },
            "planned": [
                {
                    "from": c.dead_letter.coordinates,
                    "to": f"{c.topic}/{c.partition}",
                    "code": c.dead_letter.code,
                    "eventId": c.dead_letter.event_id,
                    "redriveCount": c.dead_letter.redrive_count + 1,
                }
                for c in self.planned
            ],
        }

    def to_text(self) -> str:
        verb = "would copy" if self.dry_run else "copied"
        lines = [c_line(c) for c in self.planned]
        targets = ", ".join(f"{t}: {n}" for t, n in sorted(self.copied_to.items())) or "-"
        lines.append(
            f"{self.group}: read {self.scanned} dead letter(s); {verb} {self.copied} ({targets})"
            + ("" if self.dry_run else f" in {self.transactions} transaction(s)")
        )
        for outcome in (ALREADY, FILTERED, NO_SOURCE, NOT_AN_INPUT, NO_PARTITION):
            if self.outcomes[outcome]:
                lines.append(f"  {outcome.replace('_', ' ')}: {self.outcomes[outcome]}")
        if self.outcomes[MAX_REDRIVES]:
            lines.append(
                f"  left after {self.filter.max_redrives} redrive(s) already (they keep "
                f"failing; --max-redrives raises the limit): {self.outcomes[MAX_REDRIVES]}"
            )
        if self.not_redrivable_codes:
            codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.not_redrivable_codes.items()))
            lines.append(f"  not redrivable unless named with --code: {codes}")
        if self.forgotten_offsets:
            lines.append(
                f"  warning: the position forgot {self.forgotten_offsets} offsets of left-out "
                f"records (too many ranges to keep); --again reaches them"
            )
        return "\n".join(lines) + "\n"


def c_line(c: Copy) -> str:
    dl = c.dead_letter
    return (
        f"{dl.coordinates} -> {c.topic}/{c.partition}  {dl.stage}/{dl.code}"
        f"  event {dl.event_id or '-'}  redrive #{dl.redrive_count + 1}"
    )
