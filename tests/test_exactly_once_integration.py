"""Exactly-once on the Kafka side, on a real broker: rebalances, kill -9, durable dedup."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from connector.app import Connector
from connector.simulator import LatencySpec, SimulatorSettings, ThreadsApiSimulator, run_in_thread
from tests.harness import (
    API_KEY,
    Names,
    ensure_topics,
    event,
    make_settings,
    produce,
    read_all,
    results,
    running,
    wait_until_committed,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def produce_steadily(bootstrap: str, topic: str, ids: list[str], per_s: float) -> None:
    batch = max(1, int(per_s / 10))
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        await produce(bootstrap, topic, [(i.encode(), event(i, user=f"u{i}")) for i in chunk])
        await asyncio.sleep(0.1)


def assert_exactly_once(
    out: list[dict[str, object]], ids: list[str], sim_counts: dict[str, int]
) -> None:
    counts = Counter(str(r["eventId"]) for r in out)
    assert set(counts) == set(ids), f"missing: {sorted(set(ids) - set(counts))[:10]}"
    dupes = {e: c for e, c in counts.items() if c > 1}
    assert not dupes, f"duplicate result records: {dupes}"
    twice = {e: c for e, c in sim_counts.items() if c > 1}
    assert not twice, f"threads created more than once: {twice}"


async def test_scale_one_three_one_while_events_flow(kafka_bootstrap: str) -> None:
    names = Names.fresh("scale")
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        sim.set_latency(LatencySpec(distribution="uniform", min_ms=50, max_ms=400))
        base = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=6,
            api={"rate_limit_per_s": 150, "rate_limit_burst": 10},
        )
        await ensure_topics(base)

        def replica() -> object:
            return base.model_copy(
                update={
                    "delivery": base.delivery.model_copy(
                        update={"instance_id": os.urandom(4).hex()}
                    )
                }
            )

        ids = [f"s-{i}" for i in range(900)]
        async with running(replica()):
            feeder = asyncio.create_task(produce_steadily(kafka_bootstrap, names.input, ids, 60))
            await asyncio.sleep(3)
            async with running(replica()), running(replica()):  # 1 -> 3
                await asyncio.sleep(6)
            # 3 -> 1 (two replicas drained and left while events kept flowing)
            await feeder
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
        out = await results(kafka_bootstrap, names.results)
        assert_exactly_once(out, ids, sim.store.count_by_event_id())


def dedup_held(connector: Connector) -> set[tuple[str, int]]:
    """Partitions of the current session whose dedup restore has finished."""
    return set(connector.session._dedup_held) if connector.session is not None else set()


def _config_file(tmp_path: Path, settings: object) -> Path:
    data = settings.model_dump(mode="json", exclude={"api": {"api_key"}})  # type: ignore[attr-defined]
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            match = re.match(rf"{name}(?:{{[^}}]*}})? (\S+)", line)
            if match:
                total += float(match.group(1))
    return total


async def test_kill_dash_nine_repeatedly_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh("kill")
    with run_in_thread(SimulatorSettings(seed=4)) as sim:
        sim.set_behavior(
            sim.behavior.model_copy(
                update={"latency": LatencySpec(distribution="uniform", min_ms=50, max_ms=300)}
            )
        )
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=4,
            api={"rate_limit_per_s": 120, "rate_limit_burst": 10},
            kafka={"session_timeout_ms": 6000},
            delivery={"instance_id": "kill-test-0"},
        )
        await ensure_topics(settings)
        config = _config_file(tmp_path, settings)
        env = {
            **os.environ,
            "THREADS_CONNECTOR_API__API_KEY": API_KEY,
            "THREADS_CONNECTOR_SERVER__PORT": "0",
        }
        ids = [f"k-{i}" for i in range(600)]
        await produce(
            kafka_bootstrap, names.input, [(i.encode(), event(i, user=f"u{i}")) for i in ids]
        )

        bound = 0.0  # calls in flight, or done but not committed, at each kill
        for round_ in range(3):
            port = 19500 + round_ + (os.getpid() % 300)
            env["THREADS_CONNECTOR_SERVER__PORT"] = str(port)
            proc = subprocess.Popen(
                [sys.executable, "-m", "connector.cli", "run", "--config", str(config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                target = 60 * (round_ + 1)
                async with httpx.AsyncClient() as http:
                    for _ in range(600):
                        await asyncio.sleep(0.1)
                        try:
                            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                        except httpx.HTTPError:
                            continue
                        if len(sim.store.count_by_event_id()) >= target:
                            break
                    in_flight = _metric(text, "threads_connector_calls_in_flight")
                    created = _metric(text, "threads_connector_threads_created_total")
                    published = _metric(text, "threads_connector_results_published_total")
                bound += in_flight + max(0.0, created - published) + 20  # scrape-to-kill slack
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.wait(timeout=30)
                if proc.stderr is not None:
                    proc.stderr.close()
        async with running(settings):
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=180)
        counts = sim.store.count_by_event_id()
    out = await results(kafka_bootstrap, names.results)
    ids_out = Counter(str(r["eventId"]) for r in out)
    assert set(ids_out) == set(ids)  # no event lost
    assert all(c == 1 for c in ids_out.values())  # read_committed: no duplicate results
    twice = sum(c - 1 for c in counts.values())
    assert twice <= bound, (twice, bound)
    committed_dead = await read_all(kafka_bootstrap, names.dead)
    assert committed_dead == []


async def test_duplicate_minutes_later_across_a_restart_is_dropped_by_the_changelog(
    kafka_bootstrap: str,
) -> None:
    """The copy comes back to a new process (empty memory) 10 minutes later by the dedup
    clock: the changelog restore drops it. A copy 2 hours later, past a 1-hour window,
    is a new event again: the window bounds what dedup remembers."""
    names = Names.fresh("cl")

    async def new_process_sends_the_copy(later_s: float) -> tuple[float, float]:
        """A process whose dedup clock is ``later_s`` ahead gets the copy: (restored, hits)."""
        async with running(settings, clock=lambda: time.time() + later_s) as connector:
            await produce(kafka_bootstrap, names.input, [(b"u1", event("late-1", user="u1"))])
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
        hits = connector.metrics.dedup_hits.labels(names.input, "window")
        return connector.metrics.dedup_restored._value.get(), hits._value.get()

    async with ThreadsApiSimulator(SimulatorSettings(seed=5)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=2, dedup={"ttl_s": 3600}
        )
        assert await new_process_sends_the_copy(0) == (0, 0)
        assert sim.store.count_by_event_id() == {"late-1": 1}

        assert await new_process_sends_the_copy(600) == (1, 1)  # restored, then dropped
        assert sim.store.count_by_event_id() == {"late-1": 1}

        assert await new_process_sends_the_copy(7200) == (0, 0)  # expired: not restored
        assert sim.store.count_by_event_id() == {"late-1": 2}
    assert [r["eventId"] for r in await results(kafka_bootstrap, names.results)] == [
        "late-1",
        "late-1",
    ]


async def test_rate_limited_api_slows_the_group_without_dead_letters(kafka_bootstrap: str) -> None:
    names = Names.fresh("429")
    async with ThreadsApiSimulator(
        SimulatorSettings(seed=6, rate_limit_per_s=25, rate_limit_burst=5)
    ) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=4,
            api={
                "rate_limit_per_s": 80,
                "rate_limit_burst": 8,
                "max_attempts": 30,
                "backoff_max_s": 2.0,
                "adaptive_increase_per_s": 0.2,
            },
        )
        await ensure_topics(settings)
        ids = [f"rl-{i}" for i in range(150)]
        await produce(kafka_bootstrap, names.input, [(i.encode(), event(i)) for i in ids])
        second = settings.model_copy(
            update={"delivery": settings.delivery.model_copy(update={"instance_id": "second"})}
        )
        async with running(settings) as a, running(second) as b:
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
            slowed = sum(c.metrics.rate_limited.labels("demo-app")._value.get() for c in (a, b))
        assert sim.store.response_counts().get(429, 0) > 0
        assert slowed > 0
        assert await read_all(kafka_bootstrap, names.dead) == []
        assert_exactly_once(
            await results(kafka_bootstrap, names.results), ids, sim.store.count_by_event_id()
        )


async def test_a_fenced_instance_rejoins_without_duplicate_results(kafka_bootstrap: str) -> None:
    """Two replicas given the same instance id: the second's producer fences the first,
    which stops its work and rejoins under a new transactional id."""
    names = Names.fresh("fence")
    async with ThreadsApiSimulator(SimulatorSettings(seed=8)) as sim:
        sim.set_latency(LatencySpec(distribution="uniform", min_ms=20, max_ms=150))
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=4,
            api={"rate_limit_per_s": 150},
            delivery={"instance_id": "twin"},
        )
        await ensure_topics(settings)
        ids = [f"f-{i}" for i in range(400)]
        await produce(kafka_bootstrap, names.input, [(i.encode(), event(i)) for i in ids])
        async with running(settings) as first:
            await asyncio.sleep(1.5)
            async with running(settings) as second:
                await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=120)
                fences = first.metrics.fenced._value.get() + second.metrics.fenced._value.get()
                unknown = sum(c.metrics.api_outcome_unknown._value.get() for c in (first, second))
        assert fences >= 1
        assert first.sessions >= 2 or second.sessions >= 2
        out = await results(kafka_bootstrap, names.results)
        counts = Counter(str(r["eventId"]) for r in out)
        assert set(counts) == set(ids) and all(c == 1 for c in counts.values())
        # threads made twice can only come from work the fenced instance had not committed
        twice = sum(c - 1 for c in sim.store.count_by_event_id().values())
        assert twice <= 150 * 1.0 + unknown  # at most ~1 s of calls at the group rate


async def test_rebalance_restores_only_partitions_new_to_the_replica(kafka_bootstrap: str) -> None:
    names = Names.fresh("keep")
    async with ThreadsApiSimulator(SimulatorSettings(seed=9)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=4)
        other = settings.model_copy(
            update={"delivery": settings.delivery.model_copy(update={"instance_id": "other"})}
        )
        ids = [f"kp-{i}" for i in range(80)]
        records = [(i.encode(), event(i, user=f"u{i}")) for i in ids]
        async with running(settings) as first:
            await produce(kafka_bootstrap, names.input, records)
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            assert first.metrics.dedup_restored._value.get() == 0  # a new topic: nothing
            async with running(other) as second:  # first keeps half, second restores half
                # _dedup_held is set once an assignment's restore has finished
                while not dedup_held(second) or len(dedup_held(first)) != 2:
                    await asyncio.sleep(0.05)
                moved = second.metrics.dedup_restored._value.get()
            # the second replica left: its partitions come back to the first, only they restore
            while len(dedup_held(first)) < 4:
                await asyncio.sleep(0.05)
            came_back = first.metrics.dedup_restored._value.get()
            assert 0 < moved < len(ids) and came_back == moved
            # every copy is still caught after the moves
            await produce(kafka_bootstrap, names.input, records)
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
        assert sim.store.count_by_event_id() == dict.fromkeys(ids, 1)
