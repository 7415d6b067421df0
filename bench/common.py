"""What the throughput, in-flight and latency benchmarks share.

- ``kafka_bootstrap()``: the local broker (or ``KAFKA_BOOTSTRAP_SERVERS``).
- ``Simulator``: ``connector simulate-api`` in a process of its own, so the work of what is
  measured never delays the instrument's clock.
- ``connector_config()`` and ``start_connector()``: one ``connector run`` process.
- ``produce()``: the events, round-robin over the partitions, optionally paced.
- ``Progress``: the group's committed offsets against the end offsets, asked of Kafka.
- ``ProcSampler``: CPU seconds and peak RSS of a process from ``/proc`` (no psutil).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from connector.localkafka import LocalKafka
from connector.localkafka.ports import free_ports

PARTITIONS = 6
API_KEY = "demo-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# the local broker's pid while ``kafka_bootstrap`` runs one (None with an outside broker)
broker_pid: int | None = None


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[str]:
    global broker_pid
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        yield bootstrap
        return
    kafka = LocalKafka()
    try:
        started = kafka.start()
        broker_pid = kafka.pid
        yield started
    finally:
        broker_pid = None
        kafka.stop()


def _raise_priority() -> None:
    with contextlib.suppress(OSError):  # needs CAP_SYS_NICE; without it, measure as is
        os.nice(-10)


def wait_for_simulator(
    base_url: str, proc: subprocess.Popen[bytes], stop: Callable[[], None]
) -> None:
    """Until the simulator at ``base_url`` answers its health check (30 s at most); if it
    exits or never answers, ``stop`` it and raise."""
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"{base_url}/_simulator/health", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            if time.time() > deadline or proc.poll() is not None:
                stop()
                raise RuntimeError("the simulator did not start") from None
            time.sleep(0.2)


class Simulator:
    """The Threads API simulator in its own process, fixed latency, no rate limit."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        port = free_ports(1)[0]
        self.base_url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            *("-m", "connector.cli", "simulate-api", "--port", str(port)),
            *("--latency", "fixed", "--latency-ms", str(latency_ms), "--log-level", "WARNING"),
        ]
        self.proc = subprocess.Popen(command, preexec_fn=_raise_priority)
        wait_for_simulator(self.base_url, self.proc, self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Topics:
    """One run's topics and group: nothing is shared between runs."""

    tag: str

    @property
    def input(self) -> str:
        return f"{self.tag}-in"

    @property
    def results(self) -> str:
        return f"{self.tag}-results"

    @property
    def dlq(self) -> str:
        return f"{self.tag}-dlq"

    @property
    def group(self) -> str:
        return f"{self.tag}-group"


async def create_topics(
    bootstrap: str, topics: Topics, *, input_config: dict[str, str] | None = None
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.input, PARTITIONS, 1, topic_configs=input_config or {}),
                NewTopic(topics.results, PARTITIONS, 1),
                NewTopic(topics.dlq, PARTITIONS, 1),
            ]
        )
    finally:
        await admin.close()


def event_value(i: int) -> bytes:
    return orjson.dumps({"id": f"b-{i}", "type": "bench", "user": f"user-{i % 500}"})


async def produce(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    start: int = 0,
    rate: float | None = None,
    appended: dict[str, int] | None = None,
    encode: Callable[[str, int], bytes] | None = None,
) -> dict[str, int]:
    """Events ``b-{start}`` .. round-robin over the partitions; paced at ``rate`` per second
    if given. Returns event id -> the timestamp the producer gave the record (ms);
    ``appended`` gets event id -> the record's timestamp as the broker acknowledged it (the
    broker's append time on a ``LogAppendTime`` topic, else the same). ``encode``: the
    value of event ``i`` for ``topic`` (another format, ``bench/formats.py``); else JSON."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0 if rate else 20)
    await producer.start()
    stamps: dict[str, int] = {}
    try:
        futures = []
        began = time.monotonic()
        for n, i in enumerate(range(start, start + count)):
            if rate:
                delay = began + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            ts = int(time.time() * 1000)
            stamps[f"b-{i}"] = ts
            futures.append(
                await producer.send(
                    topic,
                    value=encode(topic, i) if encode else event_value(i),
                    key=str(i).encode(),
                    partition=i % PARTITIONS,
                    timestamp_ms=ts,
                )
            )
        acks = await asyncio.gather(*futures)
        if appended is not None:
            for event_id, ack in zip(stamps, acks, strict=True):
                appended[event_id] = ack.timestamp
    finally:
        await producer.stop()
    return stamps


def connector_config(
    bootstrap: str, base_url: str, topics: Topics, mode: str, **sections: dict[str, Any]
) -> dict[str, Any]:
    """Default settings but for what the bench needs: no rate limit to speak of."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": topics.group,
            "input_topics": [topics.input],
            "results_topic": topics.results,
            "dead_letter_topic": topics.dlq,
            "topic_partitions": PARTITIONS,
        },
        "delivery": {"mode": mode},
        "api": {"base_url": base_url, "rate_limit_per_s": 1_000_000, "rate_limit_burst": 10_000},
        "routes": [
            {
                "event_type": "bench",
                "app_uid": "demo-app",
                "agent_uid": "agent-orders",
                "message_template": "Benchmark event ${id}",
                "user": {"field": "externalUserId", "path": "user"},
            }
        ],
        "server": {"host": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def start_connector(
    data: dict[str, Any], src: str | None = None, log_path: str | None = None
) -> subprocess.Popen[bytes]:
    """``connector run`` with ``data`` as its config file; ``src``: a source tree to run
    instead of the installed package (an older commit, to compare)."""
    config = Path(tempfile.mkdtemp(prefix="bench-")) / "connector.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "THREADS_CONNECTOR_API__API_KEY": API_KEY}
    if src:
        env["PYTHONPATH"] = src
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "run", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=log,
        cwd=src,  # ``-m`` puts the working directory first on sys.path
    )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ProcSample:
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    rss_mb: float = 0.0


def sample_proc(pid: int) -> ProcSample | None:
    """CPU seconds (user + system, with waited-for children) and RSS / peak RSS (VmHWM)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    kb = {
        line.split(":")[0]: int(line.split()[1])
        for line in status.splitlines()
        if line.startswith(("VmHWM", "VmRSS"))
    }
    return ProcSample(ticks / CLK_TCK, kb.get("VmHWM", 0) / 1024, kb.get("VmRSS", 0) / 1024)


@dataclass
class Progress:
    """When the group's committed offsets passed 10 %, 90 % and 100 % of the input."""

    started: float
    total: int
    marks: dict[int, float] = field(default_factory=dict)
    last: ProcSample = field(default_factory=ProcSample)

    @property
    def elapsed_s(self) -> float:
        return self.marks[100] - self.started

    @property
    def steady_rate(self) -> float:
        """Events/s between 10 % and 90 % committed: no start-up, no tail."""
        span = self.marks[90] - self.marks[10]
        return 0.8 * self.total / span if span > 0 else float("nan")


async def wait_committed(
    bootstrap: str, topics: Topics, progress: Progress, pid: int, timeout_s: float
) -> Progress:
    """Poll the group's committed offsets (and the process's CPU and memory) until they
    reach the end offsets of the input topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topics.input, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        end_total = sum(ends.values())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sample = sample_proc(pid)
            if sample is not None:
                progress.last = sample
            committed = await admin.list_consumer_group_offsets(topics.group)
            done = sum(min(committed[tp].offset, ends[tp]) for tp in tps if tp in committed)
            now = time.monotonic()
            for mark in (10, 90, 100):
                if mark not in progress.marks and done * 100 >= end_total * mark:
                    progress.marks[mark] = now
            if 100 in progress.marks:
                return progress
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{topics.group} did not commit all of {topics.input}")
    finally:
        await consumer.stop()
        await admin.close()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (2 cores)"
