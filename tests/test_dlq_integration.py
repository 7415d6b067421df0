"""``connector dlq inspect`` and ``redrive`` on a real broker, with the connector that made
the dead letters and processes the copies (the Threads API simulator behind it)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from connector.cli import main as cli_main
from connector.config import ConnectorSettings
from connector.dlq.inspect import inspect
from connector.dlq.plan import ALREADY, NOT_REDRIVABLE, RedriveOptions
from connector.dlq.reader import DlqError
from connector.dlq.records import Filter
from connector.dlq.redrive import redrive
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    ROUTES,
    Names,
    ensure_topics,
    event,
    make_settings,
    running,
    wait_until_committed,
)
from tests.kafka_helpers import committed_offsets, consume_all, end_offsets, produce

pytestmark = pytest.mark.integration

CREATED_ROUTE: dict[str, Any] = {
    "event_type": "order.created",
    "app_uid": "demo-app",
    "agent_uid": "agent-orders",
    "message_template": "Order ${data.orderId} was created.",
    "user": {"field": "externalUserId", "path": "user.id"},
}


@pytest.fixture
async def sim() -> ThreadsApiSimulator:
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as simulator:
        yield simulator


def created(event_id: str, user: str) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(event(event_id, user=user))
    return body | {"type": "order.created"}


async def wait_for_results(bootstrap: str, topic: str, n: int) -> list[dict[str, Any]]:
    """The committed results once there are ``n`` (the input topic's end offsets are no
    target here: the redrive's transaction markers follow the copies)."""
    deadline = time.monotonic() + 60
    while True:
        out = [orjson.loads(m.value) for m in await consume_all(bootstrap, topic)]
        if len(out) >= n or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.3)


def headers_of(record: Any) -> dict[str, bytes]:
    return {k: v for k, v in record.headers}


def config_file(settings: ConnectorSettings, tmp_path: Path) -> Path:
    """The settings as the operator's YAML file (no API key: the dlq commands need none)."""
    data = settings.model_dump(mode="json")
    del data["api"]["api_key"]
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``connector dlq ... --json`` in a thread (it runs its own event loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["dlq", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return orjson.loads(out)  # type: ignore[no-any-return]


async def test_missing_route_dead_letters_redriven_once_after_the_route_is_added(
    kafka_bootstrap: str,
    sim: ThreadsApiSimulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = Names.fresh("redrive")
    before = make_settings(kafka_bootstrap, sim.base_url, names, partitions=2)
    inputs: list[tuple[bytes | None, bytes | None]] = [
        (b"u-1", event("ok-1", user="u-1")),
        (b"u-2", orjson.dumps(created("new-1", "u-2"))),
        (b"u-3", orjson.dumps(created("new-2", "u-3"))),
        (b"u-4", b"{not json"),
        (b"u-2", orjson.dumps(created("new-3", "u-2"))),
    ]
    async with running(before):
        await produce(kafka_bootstrap, names.input, inputs, headers=[("trace", b"t-1")])
        await wait_until_committed(kafka_bootstrap, names.group, names.input)
    dead = await consume_all(kafka_bootstrap, names.dead)
    assert len(dead) == 4

    # inspect: the summary by stage, code and day, and records shown with their headers
    config = config_file(before, tmp_path)
    summary = await cli(capsys, "inspect", "--config", str(config), "--show", "10")
    assert summary["total"] == 4
    counts = {(g["stage"], g["code"]): g["count"] for g in summary["groups"]}
    assert counts == {("route", "no_route"): 3, ("parse", "invalid_json"): 1}
    assert all(g["oldest"] <= g["newest"] for g in summary["groups"])
    shown = summary["records"]
    assert len(shown) == 4
    bad = next(r for r in shown if r["code"] == "invalid_json")
    assert bad["value"] == "{not json" and ["trace", "t-1"] in bad["headers"]
    assert {r["eventId"] for r in shown if r["code"] == "no_route"} == {"new-1", "new-2", "new-3"}
    assert {r["eventType"] for r in shown if r["code"] == "no_route"} == {"order.created"}
    only = await cli(capsys, "inspect", "--config", str(config), "--stage", "parse")
    assert only["total"] == 1

    # a dry run sends nothing and keeps no position
    ends_before = await end_offsets(kafka_bootstrap, names.input)
    dry = await cli(capsys, "redrive", "--config", str(config), "--dry-run")
    assert dry["wouldCopy"] == 3
    assert dry["notRedrivableCodes"] == {"invalid_json": 1}
    assert {p["eventId"] for p in dry["planned"]} == {"new-1", "new-2", "new-3"}
    assert await end_offsets(kafka_bootstrap, names.input) == ends_before
    assert await committed_offsets(kafka_bootstrap, f"{names.group}-redrive", names.dead) == {}

    # the route is added; the redrive copies the three back, once
    after = make_settings(
        kafka_bootstrap, sim.base_url, names, partitions=2, routes=[*ROUTES, CREATED_ROUTE]
    )
    first = await redrive(after, RedriveOptions(rate_per_s=100))
    assert first.copied == 3 and first.transactions >= 1
    assert first.not_redrivable_codes == {"invalid_json": 1}
    second = await redrive(after, RedriveOptions())
    assert second.copied == 0
    # it reads from the first record still to do (the invalid JSON, left): what follows
    # it on that partition was copied already
    assert second.outcomes[NOT_REDRIVABLE] == 1
    assert second.outcomes[ALREADY] == second.scanned - 1
    again = await redrive(after, RedriveOptions(dry_run=True, again=True))
    assert again.copied == 3  # --again re-reads from the start

    copies = [
        m
        for m in await consume_all(kafka_bootstrap, names.input)
        if b"dlq-redriven-from" in {k.encode() for k, _ in m.headers}
    ]
    assert len(copies) == 3
    by_offset = {(d.partition, d.offset): d for d in dead}
    for copy in copies:
        h = headers_of(copy)
        assert h["dlq-redrive-count"] == b"1"
        dlq_topic, dlq_part, dlq_off = h["dlq-redriven-from"].decode().rsplit("/", 2)
        assert dlq_topic == names.dead
        original = by_offset[(int(dlq_part), int(dlq_off))]
        source = headers_of(original)["dlq-source"].decode()
        assert source.startswith(f"{names.input}/{copy.partition}/")
        assert (copy.key, copy.value) == (original.key, original.value)
        assert h["trace"] == b"t-1"
        assert [k for k in h if k.startswith("dlq-")] == ["dlq-redrive-count", "dlq-redriven-from"]

    # the connector with the new route turns the copies into results
    async with running(after):
        out = await wait_for_results(kafka_bootstrap, names.results, 4)
    assert sorted(r["eventId"] for r in out) == ["new-1", "new-2", "new-3", "ok-1"]
    assert sim.store.count_by_event_id() == {"ok-1": 1, "new-1": 1, "new-2": 1, "new-3": 1}
    assert len(await consume_all(kafka_bootstrap, names.dead)) == 4  # nothing new failed


async def test_filters_leave_the_other_dead_letters_redrivable(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("filters")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    no_order = orjson.loads(event("gap-1", user="u-9"))
    del no_order["data"]
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"u-1", orjson.dumps(created("c-1", "u-1"))),
        (b"u-9", orjson.dumps(no_order)),
        (b"u-2", orjson.dumps(created("c-2", "u-2"))),
        (b"u-9", orjson.dumps(no_order | {"id": "gap-2"})),
        (b"u-3", orjson.dumps(created("c-3", "u-3"))),
        (b"u-5", b"[1, 2]"),
    ]
    async with running(settings):
        await produce(kafka_bootstrap, names.input, records)
        await wait_until_committed(kafka_bootstrap, names.group, names.input)

    summary = await inspect(settings, Filter())
    assert Counter({k[1]: g.count for k, g in summary.groups.items()}) == Counter(
        {"no_route": 3, "missing_field": 2, "not_an_object": 1}
    )
    by_type = await redrive(
        settings, RedriveOptions(Filter(event_types=frozenset({"order.created"})), dry_run=True)
    )
    assert sorted(c.dead_letter.event_id or "" for c in by_type.planned) == ["c-1", "c-2", "c-3"]
    by_stage = await redrive(
        settings, RedriveOptions(Filter(stages=frozenset({"validate"})), dry_run=True)
    )
    assert sorted(c.dead_letter.code for c in by_stage.planned) == ["missing_field"] * 2

    first = await redrive(settings, RedriveOptions(Filter(codes=frozenset({"no_route"}))))
    assert first.copied == 3
    # the others were left, not passed: a later redrive still copies them, and only them
    rest = await redrive(settings, RedriveOptions())
    assert rest.copied == 2 and rest.not_redrivable_codes == {"not_an_object": 1}
    assert (await redrive(settings, RedriveOptions())).copied == 0
    # a code that needs a change to the record goes only when named
    named = await redrive(settings, RedriveOptions(Filter(codes=frozenset({"not_an_object"}))))
    assert named.copied == 1
    assert (
        await redrive(settings, RedriveOptions(Filter(codes=frozenset({"not_an_object"}))))
    ).copied == 0

    copied_from = Counter(
        headers_of(m)["dlq-redriven-from"]
        for m in await consume_all(kafka_bootstrap, names.input)
        if "dlq-redriven-from" in headers_of(m)
    )
    assert len(copied_from) == 6 and set(copied_from.values()) == {1}  # each copied once
    # a time window in the future matches nothing
    late = await inspect(settings, Filter(since_ms=4_102_444_800_000))
    assert late.total == 0


async def test_a_second_redrive_fences_the_first_and_nothing_is_copied_twice(
    kafka_bootstrap: str, sim: ThreadsApiSimulator
) -> None:
    names = Names.fresh("fence")
    settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
    n = 20
    async with running(settings):
        await produce(
            kafka_bootstrap,
            names.input,
            [(f"u-{i}".encode(), orjson.dumps(created(f"c-{i}", f"u-{i}"))) for i in range(n)],
        )
        await wait_until_committed(kafka_bootstrap, names.group, names.input)

    slow = asyncio.create_task(redrive(settings, RedriveOptions(rate_per_s=8)))
    deadline = time.monotonic() + 30
    while not await committed_offsets(kafka_bootstrap, f"{names.group}-redrive", names.dead):
        assert time.monotonic() < deadline, "the slow redrive committed no batch"
        await asyncio.sleep(0.1)
    fast = await redrive(settings, RedriveOptions())  # fences the slow one
    with pytest.raises(DlqError, match="fenced"):
        await slow
    assert 0 < fast.copied < n
    copied_from = Counter(
        headers_of(m)["dlq-redriven-from"]
        for m in await consume_all(kafka_bootstrap, names.input)
        if "dlq-redriven-from" in headers_of(m)
    )
    assert len(copied_from) == n and set(copied_from.values()) == {1}
    assert (await redrive(settings, RedriveOptions())).copied == 0


async def test_hostile_dlq_headers_neither_stop_inspect_nor_redrive(kafka_bootstrap: str) -> None:
    """Dead letters written by hand or by another tool: a ``dlq-source`` naming a partition
    the input topic lacks failed aiokafka's assertion ("Unrecognized partition"), and a
    20-digit ``dlq-source-timestamp-ms`` overflowed the record builder: the redrive crashed
    at that dead letter, at every rerun, so none after it was ever copied. A 20-digit
    ``dlq-failed-at-ms`` crashed ``inspect`` (its day) for the whole topic."""
    names = Names.fresh("hostile-dlq")
    settings = make_settings(kafka_bootstrap, "http://127.0.0.1:1", names, partitions=1)
    await ensure_topics(settings)
    huge = b"99999999999999999999"
    base = {"dlq-stage": b"api", "dlq-code": b"http_503", "dlq-reason": b"503"}
    cases: list[tuple[str, dict[str, bytes]]] = [
        ("good-1", {"dlq-source": f"{names.input}/0/0".encode()}),
        ("no-partition", {"dlq-source": f"{names.input}/7/0".encode()}),
        ("huge-source-time", {"dlq-source": f"{names.input}/0/1".encode(),
                              "dlq-source-timestamp-ms": huge}),
        ("huge-failed-at", {"dlq-source": f"{names.input}/0/2".encode(),
                            "dlq-failed-at-ms": huge}),
        ("good-2", {"dlq-source": f"{names.input}/0/3".encode()}),
    ]  # fmt: skip
    for event_id, extra in cases:
        await produce(
            kafka_bootstrap,
            names.dead,
            [(b"u-1", event(event_id))],
            headers=list((base | extra).items()),
        )

    summary = await inspect(settings, Filter(), 5)
    assert summary.total == 5

    report = await redrive(settings, RedriveOptions())
    assert report.copied == 4
    assert report.outcomes["no_such_partition"] == 1
    copies = await consume_all(kafka_bootstrap, names.input)
    assert sorted(orjson.loads(m.value)["id"] for m in copies) == [
        "good-1", "good-2", "huge-failed-at", "huge-source-time"
    ]  # fmt: skip
    assert (await redrive(settings, RedriveOptions())).copied == 0  # a rerun copies nothing
