"""Two Mindset apps in one connector, on a real Kafka broker, against the simulator
configured with two apps and two keys: one app's wrong key pauses that app only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from connector.config import ENV_PREFIX
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from connector.simulator.settings import AppSpec
from tests.harness import (
    ROUTES,
    Names,
    event,
    make_settings,
    produce,
    read_all,
    results,
    running,
    wait_until_committed,
)

pytestmark = pytest.mark.integration

KEY_A = "key-of-app-a"
KEY_B = "key-of-app-b"


@pytest.fixture
async def sim() -> ThreadsApiSimulator:
    apps = {"app-a": AppSpec(api_key=SecretStr(KEY_A)), "app-b": AppSpec(api_key=SecretStr(KEY_B))}
    async with ThreadsApiSimulator(SimulatorSettings(seed=1, apps=apps)) as simulator:
        yield simulator


async def test_one_apps_wrong_key_pauses_that_app_only_then_heals(
    kafka_bootstrap: str,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = Names.fresh("apps")
    key_a = tmp_path / "app-a-key"
    key_a.write_text(KEY_B)  # app-a's secret holds the other app's key: the API says 403
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-B__API_KEY", KEY_B)
    routes = [
        {**ROUTES[0], "app_uid": "app-a"},
        {**ROUTES[0], "event_type": "order.cancelled", "app_uid": "app-b"},
    ]
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,  # app-a's waiting events sit between app-b's in one partition
        routes=routes,
        api={
            "api_key": None,  # no default key: each app has its own
            "auth_probe_interval_s": 0.5,
            "secret_refresh_s": 0.2,
            "apps": {"app-a": {"api_key_file": key_a}, "app-b": {"rate_limit_per_s": 50}},
        },
    )
    async with running(settings) as connector:
        records = []
        for i in range(5):
            records.append((b"k", event(f"a-{i}", type="order.shipped")))
            records.append((b"k", event(f"b-{i}", type="order.cancelled")))
        await produce(kafka_bootstrap, names.input, records)

        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{connector.health.port}/readyz"
            deadline = time.monotonic() + 60
            while True:
                ready = await http.get(url)
                detail = ready.json()["detail"]
                if "app app-a" in detail and len(sim.store.count_by_event_id()) >= 5:
                    break
                assert time.monotonic() < deadline, detail
                await asyncio.sleep(0.1)
        assert ready.status_code == 503
        assert "app app-a: paused" in detail and "401/403" in detail
        assert "app-b" not in detail
        assert KEY_A not in detail and KEY_B not in detail
        # app-b's events became threads while app-a's wait
        assert sim.store.count_by_event_id() == {f"b-{i}": 1 for i in range(5)}
        auth_paused = connector.metrics.auth_paused
        assert auth_paused.labels("app-a")._value.get() == 1
        assert auth_paused.labels("app-b")._value.get() == 0
        deadline = time.monotonic() + 30
        while len(out := await results(kafka_bootstrap, names.results)) < 5:
            assert time.monotonic() < deadline, out  # published in the next commit cycles
            await asyncio.sleep(0.2)
        assert sorted(r["eventId"] for r in out) == [f"b-{i}" for i in range(5)]
        assert {r["appUid"] for r in out} == {"app-b"}

        key_a.write_text(KEY_A + "\n")  # the secret is fixed (rotated)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=60)
        assert auth_paused.labels("app-a")._value.get() == 0
        assert connector.apps.pause_reason() is None

    assert await read_all(kafka_bootstrap, names.dead) == []
    expected = {f"a-{i}": 1 for i in range(5)} | {f"b-{i}": 1 for i in range(5)}
    assert sim.store.count_by_event_id() == expected
    by_event = {r["eventId"]: r["appUid"] for r in await results(kafka_bootstrap, names.results)}
    assert by_event == {e: ("app-a" if e.startswith("a-") else "app-b") for e in expected}
