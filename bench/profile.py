"""Profile one ``connector run`` process under load with py-spy (``pip install py-spy``).

A backlog on 6 partitions, the simulator at 0 ms in its own process, the connector
(``exactly_once`` unless ``--mode``, default settings, INFO logs) started on it; once it is
busy, ``py-spy record`` samples it for ``--seconds`` (collapsed stacks, plus a speedscope
file with ``--speedscope``). The report: the share of samples (inclusive) under each of the
connector's per-event steps, and the top functions by own time.

    python -m bench.profile [--events 60000] [--seconds 20] [--speedscope profile.json]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.common import (
    Simulator,
    Topics,
    connector_config,
    create_topics,
    kafka_bootstrap,
    produce,
    start_connector,
    stop_process,
)

# frames (substrings of py-spy's "function (file:line)") that stand for a per-event step
STEPS = {
    "fetch (aiokafka getmany)": "fetch (connector/source.py",
    "submit (task per record)": "submit (connector/pipeline.py",
    "parse_event (pydantic/orjson)": "parse_event (connector/events.py",
    "router.build + validate_request": "build (connector/routing.py",
    "ThreadCaller.call (incl. HTTP)": "call (connector/calls.py",
    "ThreadsClient.create_thread (HTTP)": "create_thread (connector/threads_client.py",
    "result_record": "result_record (connector/events.py",
    "deep link render": "render (connector/routing.py",
    "log line (logging)": "(logging/__init__.py",
    "JsonFormatter.format": "format (connector/logs.py",
    "metric label look-ups (.labels)": "labels (prometheus_client/metrics.py",
    "metrics inc/observe": "(prometheus_client/values.py",
    "commit cycle (Pipeline.commit)": "commit (connector/pipeline.py",
    "  producer send (aiokafka)": "send (aiokafka/producer/producer.py",
    "offsets tracker": "(connector/offsets.py",
}


def analyse(collapsed: Path, top: int) -> str:
    total = 0
    steps: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for name, needle in STEPS.items():
            if any(needle in frame for frame in frames):
                steps[name] += n
    out = [f"{total} samples"]
    out += ["per-event steps (inclusive share of all samples):"]
    out += [f"  {100 * steps[name] / total:5.1f} %  {name}" for name in STEPS]
    out += ["top functions by own time:"]
    out += [f"  {100 * n / total:5.1f} %  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--mode", default="exactly_once")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--speedscope", help="also write a speedscope profile here")
    parser.add_argument(
        "--blocking",
        action="store_true",
        help="pause the process for each sample: whole stacks (nonblocking ones can tear)",
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        sys.stderr.write("py-spy is not installed: pip install py-spy\n")
        return 1
    with kafka_bootstrap() as bootstrap, Simulator(0.0) as sim:
        topics = Topics(f"prof-{uuid.uuid4().hex[:6]}")

        async def setup() -> None:
            await create_topics(bootstrap, topics)
            await produce(bootstrap, topics.input, args.events)

        asyncio.run(setup())
        proc = start_connector(connector_config(bootstrap, sim.base_url, topics, args.mode))
        collapsed = Path(tempfile.mkdtemp(prefix="prof-")) / "stacks.txt"
        try:
            time.sleep(8)  # started, joined, busy
            record = [pyspy, "record", "-p", str(proc.pid), "-r", str(args.rate)]
            record += ["--gil"]  # time on the CPU
            if not args.blocking:
                record += ["--nonblocking"]  # the process not paused (stacks may tear)
            seconds = ["-d", str(int(args.seconds))]
            subprocess.run([*record, *seconds, "-f", "raw", "-o", str(collapsed)], check=True)
            if args.speedscope:
                out = ["-d", "10", "-f", "speedscope", "-o", args.speedscope]
                subprocess.run([*record, *out], check=True)
        finally:
            stop_process(proc)
    sys.stdout.write(analyse(collapsed, args.top) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
