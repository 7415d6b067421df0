"""Throughput side by side: the connector against a bare loop and Parallel Consumer.

Each contender is a process of its own, started on a pre-produced backlog (6 partitions)
in a group of its own, and timed from its start until the group's committed offsets reach
the end offsets (asked of Kafka). Rounds are interleaved (contender order rotates each
round) so that the load other processes put on the machine falls on all of them alike;
the report gives medians and ratios to the connector in ``exactly_once``.

Contenders:

- ``eos`` / ``alo``: ``connector run`` (a process), ``exactly_once`` / ``at_least_once``,
  default settings but for the rate limit (off) -- api.max_in_flight 256, INFO logs to
  /dev/null.
- ``bare``: ``bench/bare_loop.py`` -- aiokafka + aiohttp, semaphore 256, one result record
  per event, manual commits every 250 ms.
- ``pc``: Confluent Parallel Consumer (``bench/parallel-consumer``, UNORDERED, concurrency
  256, java.net.http). Built with Maven on first use and cached; skipped with a message if
  Java or Maven is missing.
- ``--compare NAME=SRC``: the connector (``exactly_once``) from another source tree, e.g.
  an export of an older commit, to measure a change side by side.
- ``--formats avro,protobuf,json_schema``: the connector (``exactly_once``) reading the
  same events in that input format (``bench/formats.py``: written by Confluent's
  serializers, schemas in a real registry started for the run); ``eos`` is the JSON one.
  ``--only eos --formats avro,protobuf`` runs JSON, Avro and Protobuf side by side.
- ``--traced URL``: ``traced``, the connector (``exactly_once``) with tracing on, every
  event sampled, spans exported with OTLP/HTTP to ``URL`` (``…/v1/traces``, e.g. a Jaeger
  started for the run: docs/tracing.md).

The Threads API simulator runs in its own process at 0 ms latency (one per round). The
broker, the simulator and the contender share the machine, so beside the contender's own
CPU per event the report gives the broker's and the simulator's during its run
(``broker_ms_per_event``, ``api_ms_per_event``; the broker's only for the local one).

    python -m bench.throughput [--events 20000] [--rounds 3] [--only eos,bare] [--formats avro]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (
    Progress,
    Simulator,
    Topics,
    connector_config,
    create_topics,
    kafka_bootstrap,
    load_average,
    produce,
    sample_proc,
    start_connector,
    stop_process,
    wait_committed,
)

PC_DIR = Path(__file__).parent / "parallel-consumer"
PC_JAR = PC_DIR / "target" / "pc-bench.jar"
CONCURRENCY = 256

Starter = Callable[[str, str, Topics], "subprocess.Popen[bytes]"]


def pc_jar() -> Path | None:
    """The Parallel Consumer jar, built once (again when its sources change)."""
    if not (shutil.which("java") and shutil.which("mvn")):
        sys.stderr.write("Parallel Consumer skipped: java or mvn is not installed\n")
        return None
    sources = [PC_DIR / "pom.xml", *PC_DIR.rglob("*.java")]
    if PC_JAR.exists() and all(s.stat().st_mtime <= PC_JAR.stat().st_mtime for s in sources):
        return PC_JAR
    sys.stderr.write("building bench/parallel-consumer with Maven (cached afterwards)...\n")
    built = subprocess.run(["mvn", "-q", "-B", "package"], cwd=PC_DIR, check=False)
    if built.returncode != 0 or not PC_JAR.exists():
        sys.stderr.write("Parallel Consumer skipped: the Maven build failed\n")
        return None
    return PC_JAR


def connector_starter(mode: str, src: str | None = None, *, traced: bool = False) -> Starter:
    def start(bootstrap: str, base_url: str, topics: Topics) -> subprocess.Popen[bytes]:
        data = connector_config(bootstrap, base_url, topics, mode)
        if traced:
            data["tracing"] = {"enabled": True, "service_name": "bench-traced"}
        return start_connector(data, src)

    return start


def bare_starter(bootstrap: str, base_url: str, topics: Topics) -> subprocess.Popen[bytes]:
    args = [bootstrap, topics.input, topics.results, topics.group, base_url]
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bare_loop", *args, "--concurrency", str(CONCURRENCY)],
        stderr=subprocess.DEVNULL,
    )


def pc_starter(jar: Path) -> Starter:
    def start(bootstrap: str, base_url: str, topics: Topics) -> subprocess.Popen[bytes]:
        args = [bootstrap, topics.input, topics.results, topics.group, base_url]
        return subprocess.Popen(
            ["java", "-jar", str(jar), *args, str(CONCURRENCY)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


@dataclass
class Run:
    name: str
    round: int
    events_per_s: float
    steady_per_s: float
    cpu_ms_per_event: float
    peak_rss_mb: float
    broker_ms_per_event: float | None = None
    api_ms_per_event: float | None = None


def _cpu_s(pid: int | None) -> float | None:
    sample = sample_proc(pid) if pid is not None else None
    return sample.cpu_s if sample is not None else None


def _per_event_ms(before: float | None, after: float | None, events: int) -> float | None:
    if before is None or after is None:
        return None
    return round((after - before) * 1000 / events, 3)


def run_one(
    name: str,
    start: Starter,
    bootstrap: str,
    sim: Simulator,
    events: int,
    round_: int,
    encode: Callable[[str, int], bytes] | None = None,
) -> Run:
    topics = Topics(f"tp-{name}-{uuid.uuid4().hex[:6]}")

    async def setup() -> None:
        await create_topics(bootstrap, topics)
        await produce(bootstrap, topics.input, events, encode=encode)

    asyncio.run(setup())
    others = (common.broker_pid, sim.proc.pid)
    before = [_cpu_s(pid) for pid in others]
    began = time.monotonic()
    proc = start(bootstrap, sim.base_url, topics)
    try:
        progress = Progress(began, events)
        timeout = max(600.0, events / 20)
        asyncio.run(wait_committed(bootstrap, topics, progress, proc.pid, timeout))
    finally:
        after = [_cpu_s(pid) for pid in others]
        stop_process(proc)
    sample = progress.last
    return Run(
        name,
        round_,
        round(events / progress.elapsed_s, 1),
        round(progress.steady_rate, 1),
        round(sample.cpu_s * 1000 / events, 3),
        round(sample.peak_rss_mb, 1),
        _per_event_ms(before[0], after[0], events),
        _per_event_ms(before[1], after[1], events),
    )


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: list[Run], baseline: str) -> dict[str, dict[str, Any]]:
    by_name: dict[str, list[Run]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    table = {
        name: {
            "events_per_s": statistics.median(r.events_per_s for r in rs),
            "steady_per_s": statistics.median(r.steady_per_s for r in rs),
            "cpu_ms_per_event": statistics.median(r.cpu_ms_per_event for r in rs),
            "broker_ms_per_event": _median([r.broker_ms_per_event for r in rs]),
            "api_ms_per_event": _median([r.api_ms_per_event for r in rs]),
            "peak_rss_mb": max(r.peak_rss_mb for r in rs),
            "rounds": [r.events_per_s for r in rs],
        }
        for name, rs in by_name.items()
    }
    base = table.get(baseline)
    if base:
        for row in table.values():
            row["throughput_vs_eos"] = round(row["events_per_s"] / base["events_per_s"], 2)
            row["cpu_vs_eos"] = round(row["cpu_ms_per_event"] / base["cpu_ms_per_event"], 2)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated subset of eos,alo,bare,pc")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=SRC", help="connector tree"
    )
    parser.add_argument("--traced", metavar="URL", help="add 'traced': tracing on, to URL")
    parser.add_argument("--json", help="write every run and the summary here")
    parser.add_argument("--formats", help="comma-separated subset of avro,protobuf,json_schema")
    args = parser.parse_args()

    contenders: dict[str, Starter] = {
        "eos": connector_starter("exactly_once"),
        "alo": connector_starter("at_least_once"),
        "bare": bare_starter,
    }
    wanted = set(args.only.split(",")) if args.only else {"eos", "alo", "bare", "pc"}
    if "pc" in wanted and (jar := pc_jar()) is not None:
        contenders["pc"] = pc_starter(jar)
    contenders = {k: v for k, v in contenders.items() if k in wanted}
    for spec in args.compare:
        name, src = spec.split("=", 1)
        contenders[name] = connector_starter("exactly_once", src)
    if args.traced:
        # read by the traced contender only (tracing is off in the others' settings)
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = args.traced
        os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
        contenders["traced"] = connector_starter("exactly_once", traced=True)

    loads = [load_average()]
    runs: list[Run] = []
    encoders: dict[str, Callable[[str, int], bytes]] = {}
    with contextlib.ExitStack() as stack:
        if args.formats:
            from bench import formats
            from tests.apicurio import Apicurio

            registry = stack.enter_context(Apicurio())
            for fmt in args.formats.split(","):
                contenders[fmt] = formats.starter(fmt, registry.url)
                encoders[fmt] = formats.encoder(fmt, registry.url)
        names = list(contenders)
        bootstrap = stack.enter_context(kafka_bootstrap())
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            with Simulator(0.0) as sim:
                for name in order:
                    run = run_one(
                        name,
                        contenders[name],
                        bootstrap,
                        sim,
                        args.events,
                        round_,
                        encoders.get(name),
                    )
                    runs.append(run)
                    sys.stderr.write(f"round {round_}: {run}\n")
            loads.append(load_average())
    summary = summarize(runs, "eos")
    report = {"events": args.events, "rounds": args.rounds, "load_average": loads, **summary}
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [vars(r) for r in runs], **report}))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    header = (
        f"{'':8}{'events/s':>10}{'steady/s':>10}{'CPU ms/ev':>11}{'broker':>8}{'API':>7}"
        f"{'peak MB':>9}{'x eos':>7}"
    )
    sys.stdout.write(header + "\n")
    for name, row in summary.items():
        sys.stdout.write(
            f"{name:8}{row['events_per_s']:>10}{row['steady_per_s']:>10}"
            f"{row['cpu_ms_per_event']:>11}{row['broker_ms_per_event'] or '-':>8}"
            f"{row['api_ms_per_event'] or '-':>7}{row['peak_rss_mb']:>9}"
            f"{row.get('throughput_vs_eos', ''):>7}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
