"""The hostile corpus (``tests/hostile_corpus.py``) end to end on a real broker: every
record gets exactly its expected outcome, among valid events that all get their results,
with every offset committed, no thread created twice, and the session never restarted."""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaProducer

from connector.bounds import record_size
from connector.errors import EventRejected
from connector.events import InputRecord, parse_event
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import (
    Names,
    event,
    make_settings,
    read_all,
    running,
    wait_until_committed,
)
from tests.hostile_corpus import (
    CORPUS_ROUTES,
    LIMIT,
    NEEDS_EVENT_ID_RULES,
    Case,
    event_id_rules_present,
    hostile_corpus,
)
from tests.kafka_helpers import create_topics

BIG_TOPIC_BYTES = 8 * 1024 * 1024
RULES = event_id_rules_present()


def test_corpus_is_seeded_and_has_at_least_40_kinds() -> None:
    first, again, other = hostile_corpus(1), hostile_corpus(1), hostile_corpus(2)
    assert len({c.kind for c in first}) == len(first) >= 40
    assert [(c.key, c.value, c.headers) for c in first] == [
        (c.key, c.value, c.headers) for c in again
    ]
    assert [c.value for c in first] != [c.value for c in other]


@pytest.mark.parametrize(
    "case", [c for c in hostile_corpus() if c.kind in NEEDS_EVENT_ID_RULES], ids=lambda c: c.kind
)
def test_event_id_rule_cases(case: Case) -> None:
    """Enabled once connector.events has the event-id rules (another branch)."""
    if not RULES:
        pytest.skip("needs the event-id rules (invalid_event_id) in connector.events")
    record = InputRecord("t", 0, 0, case.key, case.value, case.headers)
    try:
        parse_event(record, id_field="id", id_header="event-id", type_field="type")
    except EventRejected as exc:
        assert case.expect.outcome == "dead_letter", (case.kind, exc.code)
        assert (exc.stage.value, exc.code) == (case.expect.stage, case.expect.code)
        return
    assert case.expect.outcome != "dead_letter", case.kind


def header(record: object, name: str) -> bytes | None:
    found = None
    for key, value in record.headers:  # type: ignore[attr-defined]
        if key == name:
            found = value
    return found


async def produce_each(bootstrap: str, topic: str, records: list[Case]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=BIG_TOPIC_BYTES
    )
    await producer.start()
    try:
        for r in records:  # one at a time: offsets in list order
            await (await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers)))
    finally:
        await producer.stop()


@pytest.mark.integration
async def test_hostile_corpus_among_valid_events(kafka_bootstrap: str) -> None:
    cases = hostile_corpus(seed=9)
    names = Names.fresh("corpus")
    await create_topics(
        kafka_bootstrap, {names.input: 1}, config={"max.message.bytes": str(BIG_TOPIC_BYTES)}
    )
    records: list[Case] = []
    for i, case in enumerate(cases):
        records.append(Case(f"valid-{i}", event(f"valid-{i}"), case.expect, key=b"v"))
        records.append(case)
    async with ThreadsApiSimulator(SimulatorSettings(seed=4)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url, names, partitions=1, routes=CORPUS_ROUTES
        )
        async with running(settings) as connector:
            await produce_each(kafka_bootstrap, names.input, records)
            await wait_until_committed(kafka_bootstrap, names.group, names.input, timeout_s=240)
            assert connector.sessions == 1  # never restarted
            bounded = connector.session.sink.bounded if connector.session else 0
        created = sim.store.count_by_event_id()
    # the standard library's parser: orjson would read an integer id beyond 64 bits as a float
    out = [json.loads(m.value) for m in await read_all(kafka_bootstrap, names.results)]
    dead = await read_all(kafka_bootstrap, names.dead)
    by_offset: dict[int, list[tuple[str, object]]] = {}
    for r in out:
        by_offset.setdefault(r["source"]["offset"], []).append(("result", r))
    for d in dead:
        source = (header(d, "dlq-source") or b"").decode()
        assert source.startswith(f"{names.input}/0/"), source
        by_offset.setdefault(int(source.rsplit("/", 1)[1]), []).append(("dead_letter", d))
    assert set(by_offset) <= set(range(len(records)))

    problems: list[str] = []
    for offset, case in enumerate(records):
        got = by_offset.get(offset, [])
        if case.kind.startswith("valid-"):
            if [k for k, _ in got] != ["result"] or got[0][1]["eventId"] != case.kind:  # type: ignore[index]
                problems.append(f"{case.kind}: {got}")
            continue
        if case.kind in NEEDS_EVENT_ID_RULES and not RULES:
            if len(got) > 1:
                problems.append(f"{case.kind}: {len(got)} outcomes")
            continue
        problems += check(case, got)
    assert not problems, "\n".join(problems)
    assert bounded >= sum(1 for c in cases if c.expect.bounded)
    # no thread was created twice (the pair int id / string id is two events by the rules)
    twice = {e: n for e, n in created.items() if n > 1}
    assert not twice or (RULES and len(twice) == 1), twice


def check(case: Case, got: list[tuple[str, object]]) -> list[str]:
    expect = case.expect
    kinds = [k for k, _ in got]
    if expect.outcome == "duplicate":
        return [] if not got else [f"{case.kind}: expected a duplicate drop, got {kinds}"]
    if kinds != [expect.outcome]:
        return [f"{case.kind}: expected {expect.outcome}, got {kinds}"]
    record = got[0][1]
    if expect.outcome == "result":
        event_id = str(record["eventId"])  # type: ignore[index]
        ok = event_id == expect.event_id
        return [] if ok else [f"{case.kind}: eventId {event_id[:80]!r}"]
    problems = []
    stage = header(record, "dlq-stage")
    code = header(record, "dlq-code")
    if (stage, code) != (expect.stage.encode(), expect.code.encode()):
        problems.append(f"{case.kind}: dead letter {stage!r}/{code!r}, expected {expect}")
    for name, value in expect.headers.items():
        if header(record, name) != value:
            problems.append(f"{case.kind}: header {name}={header(record, name)!r}")
    cut = header(record, "dlq-value-cut") is not None
    if expect.bounded is not None and cut != expect.bounded:
        problems.append(f"{case.kind}: bounded={cut}, expected {expect.bounded}")
    if not cut and record.value != case.value:  # type: ignore[attr-defined]
        problems.append(f"{case.kind}: the original value was not kept")
    if cut and case.value:
        value = record.value or b""  # type: ignore[attr-defined]
        if not case.value.startswith(value):
            problems.append(f"{case.kind}: the cut value is not a prefix of the original")
    for name, value in record.headers:  # type: ignore[attr-defined]
        if name.startswith("dlq-"):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{case.kind}: header {name} is not valid UTF-8")
    size = record_size(record.key, record.value, record.headers)  # type: ignore[attr-defined]
    if size > LIMIT:
        problems.append(f"{case.kind}: dead letter of {size} bytes")
    return problems
