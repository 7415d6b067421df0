"""``connector demo``: the main job end to end on a local default.

Starts a local Apache Kafka broker (``connector.localkafka``) and the Threads API
simulator, runs the connector from ``config/connector.yaml`` against them, produces the
sample events, waits until every one is finished, and prints the results and the dead
letters as tables. A development tool: it talks to Kafka directly for the samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from connector.app import Connector
from connector.config import ENV_PREFIX, ConnectorSettings, load_settings
from connector.events import InputRecord
from connector.localkafka import LocalKafka
from connector.simulator import LatencySpec, SimulatorSettings, ThreadsApiSimulator
from connector.simulator.settings import DEFAULT_API_KEY
from connector.source import TopicReader
from connector.topics import TopicManager

WAIT_S = 120.0


def load_samples(path: Path) -> list[tuple[bytes | None, bytes]]:
    """``{"key", "value"}`` lines; ``raw`` instead of ``value`` sends bytes as they are."""
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = orjson.loads(line)
        key = item["key"].encode() if item.get("key") else None
        value = item["raw"].encode() if "raw" in item else orjson.dumps(item["value"])
        samples.append((key, value))
    return samples


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    _out("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    _out("  ".join("-" * w for w in widths))
    for row in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _header(record: InputRecord, name: str) -> str:
    raw = record.header(name)
    return raw.decode() if raw else ""


async def run_demo(
    config: Path, events: Path, keep_running: bool, bootstrap: str | None = None
) -> int:
    """The demo; SIGTERM or SIGINT stops it like the end of ``--keep-running`` does: the
    connector drains, the simulator stops, the local broker's JVM is stopped and its
    temporary folder removed (Python's default SIGTERM ended the process at once and left
    both behind)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, interrupted.set)
    demo = asyncio.ensure_future(_demo(config, events, keep_running, bootstrap, interrupted))
    waiter = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({demo, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not demo.done() and not keep_running:
            demo.cancel()  # a signal before the results: stop now, cleaning up
        with contextlib.suppress(asyncio.CancelledError):
            return await demo
        _out("stopped by a signal; the local broker and its folder are removed")
        return 128 + signal.SIGTERM
    finally:
        waiter.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _demo(
    config: Path,
    events: Path,
    keep_running: bool,
    bootstrap: str | None,
    interrupted: asyncio.Event,
) -> int:
    samples = load_samples(events)
    async with contextlib.AsyncExitStack() as stack:
        if bootstrap is None:
            _out("starting a local Apache Kafka broker (first run fetches its jars with Maven)…")
            kafka = LocalKafka()
            await asyncio.to_thread(kafka.start)
            stack.callback(kafka.stop)
            bootstrap = kafka.bootstrap_servers
        sim = ThreadsApiSimulator(
            SimulatorSettings(
                latency=LatencySpec(distribution="lognormal", median_ms=400, p99_ms=2000),
                seed=7,
            )
        )
        await stack.enter_async_context(sim)
        settings = _demo_settings(config, bootstrap, sim.base_url)
        _out(f"kafka     {bootstrap}")
        _out(f"simulator {sim.base_url}  (threads API, key '{DEFAULT_API_KEY}')")

        connector = Connector(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(connector.run(stop))
        stack.push_async_callback(_stop_connector, stop, task)  # also when cancelled
        await _first(connector.started.wait(), task)
        metrics_url = f"http://127.0.0.1:{connector.health.port}/metrics"
        _out(f"metrics   {metrics_url}")

        await _produce(bootstrap, settings.kafka.input_topics[0], samples)
        _out(f"produced  {len(samples)} sample events to {settings.kafka.input_topics[0]}")
        await _wait_finished(connector, len(samples), task)

        results, dead = await _read_outputs(settings)
        _print_results(results, dead, sim)
        _print_summary(connector)
        _out(f"\nmetrics: {metrics_url}")
        if keep_running:
            _out("running; Ctrl-C (or SIGTERM) to stop")
            waiter = asyncio.ensure_future(interrupted.wait())
            done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if task in done:
                task.result()  # the connector failed: say so
    return 0


async def _stop_connector(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _print_summary(connector: Connector) -> None:
    def total(name: str) -> float:
        return sum(
            s.value
            for metric in connector.metrics.registry.collect()
            for s in metric.samples
            if s.name == name
        )

    p = "threads_connector_"
    _out(
        f"connector: {total(p + 'events_consumed_total'):.0f} events consumed, "
        f"{total(p + 'threads_created_total'):.0f} threads created, "
        f"{total(p + 'dedup_hits_total'):.0f} duplicate dropped, "
        f"{total(p + 'dead_letters_total'):.0f} dead letters, "
        f"{total(p + 'api_retries_total'):.0f} retries"
    )


def _demo_settings(config: Path, bootstrap: str, base_url: str) -> ConnectorSettings:
    group = f"threads-demo-{int(time.time())}"
    overrides = {
        "KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA__GROUP_ID": group,
        "KAFKA__TOPIC_PARTITIONS": "3",
        "KAFKA__CREATE_INPUT_TOPICS": "true",  # the demo's own broker and topic
        "API__BASE_URL": base_url,
        "API__API_KEY": DEFAULT_API_KEY,
        "API__RATE_LIMIT_PER_S": "50",
        "SERVER__HOST": "127.0.0.1",
        "SERVER__PORT": "0",
        # the simulator answers in milliseconds: a short drain, and calls bounded below it
        # (the configuration refuses a drain shorter than a call may take)
        "API__REQUEST_TIMEOUT_S": "4",
        "DELIVERY__DRAIN_TIMEOUT_S": "5",
        "DELIVERY__REVOKE_TIMEOUT_S": "5",
    }
    saved = {k: os.environ.get(ENV_PREFIX + k) for k in overrides}
    os.environ.update({ENV_PREFIX + k: v for k, v in overrides.items()})
    try:
        return load_settings(config)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(ENV_PREFIX + k, None)
            else:
                os.environ[ENV_PREFIX + k] = v


async def _first(awaitable: Any, task: asyncio.Task[None]) -> None:
    """Wait for ``awaitable``, but surface the connector task's failure if it dies first."""
    waiter = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("the connector stopped before it was ready")


async def _produce(bootstrap: str, topic: str, samples: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in samples:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def _wait_finished(connector: Connector, expected: int, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pipeline = connector.pipeline
        if pipeline is not None:
            st = pipeline.stats
            if st.results + st.dead_letters + st.duplicates >= expected:
                return
        if task.done():
            task.result()
            raise RuntimeError("the connector stopped early")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"not every sample event finished within {WAIT_S:.0f}s")


async def _read_outputs(settings: ConnectorSettings) -> tuple[list[InputRecord], list[InputRecord]]:
    k = settings.kafka
    async with TopicManager(settings) as topics:
        counts = await topics.partitions([k.results_topic, k.dead_letter_topic])
    reader = TopicReader(settings)
    results = await reader.read_topic(k.results_topic, counts[k.results_topic])
    dead = await reader.read_topic(k.dead_letter_topic, counts[k.dead_letter_topic])
    return results, dead


def _print_results(
    results: list[InputRecord], dead: list[InputRecord], sim: ThreadsApiSimulator
) -> None:
    rows = []
    for record in sorted(results, key=lambda r: orjson.loads(r.value or b"{}")["eventId"]):
        v = orjson.loads(record.value or b"{}")
        rows.append(
            [
                v["eventId"],
                v["eventType"],
                v["humanUid"],
                v["threadUid"],
                str(v["attempts"]),
                v["deepLink"],
            ]
        )
    _out(f"\nresults ({len(rows)} records on the results topic)")
    _table(["eventId", "eventType", "humanUid", "threadUid", "attempts", "deepLink"], rows)
    rows = [
        [
            _header(r, "dlq-source"),
            _header(r, "dlq-stage"),
            _header(r, "dlq-code"),
            _header(r, "dlq-reason")[:90],
        ]
        for r in dead
    ]
    _out(f"\ndead letters ({len(rows)} records, original bytes kept)")
    _table(["source", "stage", "code", "reason"], rows)
    counts = sim.store.count_by_event_id()
    _out(
        f"\nsimulator: {sum(counts.values())} threads created for {len(counts)} event ids"
        f" (a duplicate event made no second thread: max {max(counts.values(), default=0)}"
        f" per event id)"
    )
