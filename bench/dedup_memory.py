"""Memory per dedup entry, to size ``dedup.max_entries`` (DESIGN.md §4).

Fills a ``DedupWindow`` with N entries shaped like production ones (a UUID-like event id,
a thread uid, 6 partitions) and measures the Python heap with ``tracemalloc``; also
reports the peak RSS growth of the same fill in a separate process without tracemalloc
(whose own bookkeeping would inflate it). Prints bytes per entry.

    python -m bench.dedup_memory [--entries 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
import tracemalloc
import uuid

from connector.dedup import DedupWindow, Seen


def fill(entries: int) -> DedupWindow:
    window = DedupWindow(ttl_s=86_400, max_entries=entries)
    now = time.time()
    for i in range(entries):
        tp = ("domain-events", i % 6)
        window.add(tp, Seen(str(uuid.uuid4()), now, f"th_{uuid.uuid4().hex}"))
    return window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_only:  # child process: the fill without tracemalloc's own overhead
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        window = fill(args.entries)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        sys.stdout.write(f"{grown} {len(window)}\n")
        return 0
    child = subprocess.run(
        [sys.executable, "-m", "bench.dedup_memory", "--entries", str(args.entries), "--rss-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    rss_growth_kib = int(child.stdout.split()[0])
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    window = fill(args.entries)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_entry = (after - before) / args.entries
    report = {
        "entries": len(window),
        "heap_bytes_per_entry": round(per_entry, 1),
        "heap_mib_total": round((after - before) / 2**20, 1),
        "rss_growth_mib_untraced": round(rss_growth_kib / 1024, 1),
        "rss_bytes_per_entry_untraced": round(rss_growth_kib * 1024 / args.entries, 1),
        "mib_per_million_entries": round(per_entry * 1_000_000 / 2**20, 1),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
