"""The connector against a hostile Threads API (issue 11), end to end on a real broker.

Each case: the simulator misbehaves in one way (``HostileSpec``, TLS, or not listening),
a real ``Connector`` runs, and the test checks that waits and memory stay bounded,
readiness tells the truth, nothing is dead-lettered for the API's fault, and the API key
never leaves the ``x-api-key`` header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from connector.app import Connector
from connector.localkafka.ports import free_ports
from connector.simulator import (
    AppSpec,
    HostileSpec,
    SimulatorSettings,
    ThreadsApiSimulator,
    make_private_ca,
)
from tests.harness import (
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


@pytest.fixture
async def sim() -> ThreadsApiSimulator:
    async with ThreadsApiSimulator(SimulatorSettings(seed=1)) as simulator:
        yield simulator


async def readyz(connector: Connector) -> tuple[int, str]:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{connector.health.port}/readyz")
        return r.status_code, str(r.json()["detail"])


async def metrics_text(connector: Connector) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{connector.health.port}/metrics")).text


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never held")
        await asyncio.sleep(0.1)


async def not_ready_with(connector: Connector, words: str) -> None:
    async def check() -> bool:
        status, detail = await readyz(connector)
        return status == 503 and words in detail

    await eventually(check)


def gauge(connector: Connector, name: str) -> float:
    """The gauge of the route's app (demo-app), or the unlabelled one; -1: absent."""
    for labels in ({"app": "demo-app"}, {}):
        value = connector.metrics.registry.get_sample_value(f"threads_connector_{name}", labels)
        if value is not None:
            return value
    return -1.0


async def produce_events(bootstrap: str, names: Names, prefix: str, n: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    await produce(bootstrap, names.input, [(b"k", event(i)) for i in ids])
    return ids


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "asked_s"), [("retry_after", 999_999), ("retry_after_date", 86_400)]
)
async def test_a_huge_retry_after_is_capped_logged_shown_and_turns_readiness_red(
    kafka_bootstrap: str,
    sim: ThreadsApiSimulator,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    asked_s: int,
) -> None:
    names = Names.fresh("ra")
    sim.set_hostile(HostileSpec(mode=mode, retry_after_s=asked_s, count=1))  # type: ignore[arg-type]
    settings = make_settings(
        kafka_bootstrap,
        sim.base_url,
        names,
        partitions=1,
        api={"max_retry_after_s": 6, "max_pause_ready_s": 2},
    )
    caplog.set_level(logging.WARNING, logger="connector.calls")
    async with running(settings) as connector:
        ids = await produce_events(kafka_bootstrap, names, "ra", 3)
        await not_ready_with(connector, "Retry-After")
        assert 0 < gauge(connector, "api_paused_seconds") <= 6
        assert "threads_connector_api_paused_seconds" in await metrics_text(connector)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
        assert (await readyz(connector))[0] == 200
    pauses = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(pauses) == 1
    assert "paused 6s" in pauses[0] and "capped" in pauses[0]
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids


# -- bounded attempts ----------------------------------------------------------------------


async def test_a_trickling_201_body_ends_at_the_request_timeout_and_is_retried(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("trickle")
    # a byte a second never trips a per-read timeout of 3 s; only a total deadline ends it
    sim.set_hostile(HostileSpec(mode="trickle_body", trickle_interval_s=1.0, count=1))
    settings = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=1, api={"request_timeout_s": 3}
    )
    async with running(settings) as connector:
        ids = await produce_events(kafka_bootstrap, names, "tr", 2)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
        assert gauge(connector, "api_outcome_unknown_total") == 1
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids
    # the trickled 201 did create a thread: the retry made a second one (outcome unknown)
    assert sorted(sim.store.count_by_event_id().values()) == [1, 2]


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


async def test_a_50_mb_201_body_is_cut_off_without_being_held(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    body_bytes = 50 * 1024 * 1024
    names = Names.fresh("huge")
    sim.set_hostile(HostileSpec(mode="huge_body", body_bytes=body_bytes, count=1))
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    async with running(settings) as connector:
        if not _peak_rss_reset():
            pytest.fail("cannot reset the peak RSS (/proc/self/clear_refs)")
        before = _peak_rss_bytes()
        ids = await produce_events(kafka_bootstrap, names, "hg", 2)
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
        grown = _peak_rss_bytes() - before
        retries = connector.metrics.registry.get_sample_value(
            "threads_connector_api_retries_total", {"code": "body_too_large"}
        )
    assert grown < body_bytes / 2, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    assert retries == 1
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids


# -- the API key ---------------------------------------------------------------------------

GOOD_KEY = "good-LEAKMARK-key"


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param(f"{GOOD_KEY}\nLEAKMARK-after-newline", id="newline"),
        pytest.param("kéy-LEAKMARK-non-ascii", id="non-ascii"),
        pytest.param(None, id="good"),
    ],
)
async def test_the_api_key_reaches_no_record_header_log_or_metric(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad_key: str | None
) -> None:
    """A key that cannot be a header pauses calls (nothing dead-lettered, readiness red,
    naming the file) until the file is fixed; no path copies any key anywhere."""
    apps = {"demo-app": AppSpec(api_key=SecretStr(GOOD_KEY))}
    names = Names.fresh("key")
    key_file = tmp_path / "api-key"
    key_file.write_text(bad_key if bad_key is not None else f"{GOOD_KEY}\n", encoding="utf-8")
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with ThreadsApiSimulator(SimulatorSettings(seed=1, apps=apps)) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=1,
            api={
                "api_key": None,
                "api_key_file": key_file,
                "auth_probe_interval_s": 0.5,
                "secret_refresh_s": 0.2,
            },
            logging={"level": "DEBUG"},
        )
        async with running(settings) as connector:
            ids = await produce_events(kafka_bootstrap, names, "k", 4)
            if bad_key is not None:
                await not_ready_with(connector, str(key_file))
                seen.append((await readyz(connector))[1])
                assert gauge(connector, "api_key_invalid") == 1
                assert gauge(connector, "auth_paused") == 1
                seen.append(await metrics_text(connector))
                assert sim.store.count_by_event_id() == {}
                key_file.write_text(GOOD_KEY, encoding="utf-8")  # the secret is fixed
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
            assert gauge(connector, "api_key_invalid") in (0, -1)
            seen.append((await readyz(connector))[1])
            seen.append(await metrics_text(connector))
        dead = await read_all(kafka_bootstrap, names.dead)
        records = dead + await read_all(kafka_bootstrap, names.results)
    assert dead == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids
    for record in records:
        seen.append(repr(record.value))
        seen.extend(repr(value) for _, value in record.headers)
    for log_record in caplog.records:
        seen.append(log_record.getMessage())
        seen.append(repr(log_record.__dict__))
        if log_record.exc_info:
            seen.append(logging.Formatter().formatException(log_record.exc_info))
    leaks = [text for text in seen if "LEAKMARK" in text]
    assert leaks == []


# -- the circuit breaker -------------------------------------------------------------------

BREAKER: dict[str, Any] = {"breaker_failure_threshold": 3, "breaker_probe_interval_s": 0.5}


async def test_an_untrusted_certificate_opens_the_breaker_without_dead_letters(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    tls = make_private_ca(tmp_path)
    names = Names.fresh("tls")
    sim_settings = SimulatorSettings(tls_cert_file=tls.cert_file, tls_key_file=tls.key_file)
    async with ThreadsApiSimulator(sim_settings) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1, api=BREAKER)
        async with running(settings) as connector:
            await produce_events(kafka_bootstrap, names, "tls", 3)
            await not_ready_with(connector, "circuit breaker")
            assert gauge(connector, "api_breaker_open") == 1
            await asyncio.sleep(3)  # several probes fail: still nothing dead-lettered
            assert (await readyz(connector))[0] == 503
        assert len(sim.store) == 0
    assert await read_all(kafka_bootstrap, names.dead) == []


async def test_a_private_ca_through_ca_file_works(kafka_bootstrap: str, tmp_path: Path) -> None:
    tls = make_private_ca(tmp_path)
    names = Names.fresh("ca")
    sim_settings = SimulatorSettings(tls_cert_file=tls.cert_file, tls_key_file=tls.key_file)
    async with ThreadsApiSimulator(sim_settings) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=1, api={"ca_file": tls.ca_file}
        )
        async with running(settings):
            ids = await produce_events(kafka_bootstrap, names, "ca", 3)
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids
    assert await read_all(kafka_bootstrap, names.dead) == []


async def test_connection_refused_opens_the_breaker_then_heals(kafka_bootstrap: str) -> None:
    (port,) = free_ports(1)
    names = Names.fresh("refused")
    settings = make_settings(
        kafka_bootstrap, f"http://127.0.0.1:{port}", names, partitions=1, api=BREAKER
    )
    async with running(settings) as connector:
        ids = await produce_events(kafka_bootstrap, names, "rf", 5)
        await not_ready_with(connector, "circuit breaker")
        assert gauge(connector, "api_breaker_open") == 1
        await asyncio.sleep(2)  # the outage lasts: probes fail, nothing is dead-lettered
        async with ThreadsApiSimulator(SimulatorSettings(port=port)) as sim:
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
            assert gauge(connector, "api_breaker_open") == 0
            assert (await readyz(connector))[0] == 200
            assert sorted(sim.store.count_by_event_id()) == ids
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids


@pytest.mark.parametrize(
    ("mode", "cause"),
    [("black_hole", "no complete answer within 1s"), ("reset", "protocol_error")],
)
async def test_an_api_that_never_answers_opens_the_breaker_without_dead_letters(
    kafka_bootstrap: str, sim: ThreadsApiSimulator, mode: str, cause: str
) -> None:
    """Issue 20 item 2: an API that accepts and never answers (or drops the connection
    without an answer). Before, timeouts and drops did not count toward the breaker: every
    event was dead-lettered (``retries_exhausted``, here within 4 s) and /readyz stayed
    200. Now the breaker opens, /readyz names the cause, one probe retries, and once the
    API answers every event is made, once."""
    names = Names.fresh(mode.replace("_", ""))
    sim.set_hostile(HostileSpec(mode=mode))  # type: ignore[arg-type]
    api = BREAKER | {"request_timeout_s": 1, "max_attempts": 3}
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1, api=api)
    async with running(settings) as connector:
        ids = await produce_events(kafka_bootstrap, names, mode, 10)
        await not_ready_with(connector, "circuit breaker")
        _status, detail = await readyz(connector)
        assert cause in detail, detail
        assert gauge(connector, "api_breaker_open") == 1
        # the outage lasts twice what the events' attempts took to run out before
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert (await readyz(connector))[0] == 503
            await asyncio.sleep(0.5)
        assert await read_all(kafka_bootstrap, names.dead) == []
        assert len(sim.store) == 0
        sim.set_hostile(HostileSpec())  # the API answers again
        await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=40)
        assert gauge(connector, "api_breaker_open") == 0
        assert (await readyz(connector))[0] == 200
    assert await read_all(kafka_bootstrap, names.dead) == []
    assert sorted(r["eventId"] for r in await results(kafka_bootstrap, names.results)) == ids
    assert sim.store.count_by_event_id() == {i: 1 for i in ids}
