"""The local Apache Kafka broker and the Kafka test helpers, against a real broker."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from connector import localkafka
from connector.localkafka import LocalKafka, LocalKafkaError
from tests.kafka_helpers import (
    CONSUMER_GROUP_COMMAND,
    committed_offsets,
    consume_all,
    create_topics,
    end_offsets,
    parse_group_describe,
    produce,
    tool_committed_offsets,
    tool_end_offsets,
    unique_name,
)

ROOT = Path(__file__).resolve().parents[1]


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


# ------------------------------------------------------------------------ unit tests


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    text = localkafka.render_server_properties(
        port=41001,
        controller_port=41002,
        log_dir=tmp_path / "data",
        overrides={"num.partitions": "2"},
    )
    props = _props(text)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:41001,CONTROLLER://127.0.0.1:41002"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:41001"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:41002"
    assert props["log.dirs"] == str(tmp_path / "data")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert props[key] == "1", key
    assert int(props["offsets.topic.num.partitions"]) <= 3
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.cleaner.enable"] == "true"
    assert 1024 * 1024 <= int(props["log.segment.bytes"]) <= 64 * 1024 * 1024
    assert props["num.partitions"] == "2"  # overrides win


def test_log4j_config_is_quiet_and_escapes_the_path(tmp_path: Path) -> None:
    xml = localkafka.render_log4j2(tmp_path / 'a"b' / "kafka.log")
    assert 'Root level="WARN"' in xml
    assert "&quot;" in xml or "'" in xml


def test_cluster_id_looks_like_kafkas() -> None:
    ids = {localkafka.random_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 22 and not i.startswith("-") and "=" not in i for i in ids)


def test_missing_mvn_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(LocalKafkaError, match=r"Maven \('mvn'\).*apt-get install maven"):
        localkafka.ensure_jars(tmp_path / "cache")


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(LocalKafkaError, match=r"Java 17\+.*openjdk-17"):
        localkafka.find_executable("java")


def test_cached_jars_need_no_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    libs = localkafka.ensure_jars()  # fetched once (or already cached)
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn now
    started = time.monotonic()
    assert localkafka.ensure_jars() == libs
    assert time.monotonic() - started < 0.5
    assert (libs / f"kafka_2.13-{localkafka.KAFKA_VERSION}.jar").is_file()
    assert (libs / f"kafka-tools-{localkafka.KAFKA_VERSION}.jar").is_file()


def test_parse_group_describe() -> None:
    out = """
Consumer group 'g' has no active members.

GROUP           TOPIC           PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG             CONSUMER-ID     HOST            CLIENT-ID
g               t               1          7               9               2               -               -               -
g               t               0          -               4               -               -               -               -
g               other           0          3               3               0               -               -               -
"""  # noqa: E501
    assert parse_group_describe(out, "t") == {1: 7}


# ------------------------------------------------------------------------ integration

integration = pytest.mark.integration


@integration
async def test_broker_answers_metadata(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    assert len(cluster["brokers"]) >= 1
    # the readiness probe works from inside a running event loop too
    assert localkafka.metadata_broker_count(kafka_bootstrap) >= 1


@integration
async def test_produce_consume_round_trip(kafka_bootstrap: str) -> None:
    topic = unique_name("roundtrip")
    await create_topics(kafka_bootstrap, {topic: 3})
    records = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(30)]
    placed = await produce(kafka_bootstrap, topic, records)
    assert len(placed) == 30

    got = await consume_all(kafka_bootstrap, topic)
    assert sorted((m.key, m.value) for m in got) == sorted(records)
    by_key: dict[bytes, list[bytes]] = {}
    for m in got:
        by_key.setdefault(m.key, []).append(m.value)
    for key, values in by_key.items():  # one key, one partition: produce order kept
        assert values == [v for k, v in records if k == key]

    ends = await end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == 30
    assert await tool_end_offsets(kafka_bootstrap, topic) == ends


@integration
async def test_aborted_transaction_is_invisible_to_read_committed(kafka_bootstrap: str) -> None:
    topic = unique_name("txn")
    await create_topics(kafka_bootstrap, {topic: 2})
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("txid")
    )
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, f"committed-{i}".encode(), key=b"a")
        await producer.begin_transaction()
        for i in range(4):
            await producer.send(topic, f"aborted-{i}".encode(), key=b"b")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-last", key=b"b")
    finally:
        await producer.stop()

    committed = [m.value.decode() for m in await consume_all(kafka_bootstrap, topic)]
    assert sorted(committed) == sorted([f"committed-{i}" for i in range(5)] + ["committed-last"])
    raw = await consume_all(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    assert len(raw) == 10
    assert {m.value.decode() for m in raw} >= {f"aborted-{i}" for i in range(4)}


@integration
async def test_consumer_group_command_sees_committed_offsets(kafka_bootstrap: str) -> None:
    source, sink, group = unique_name("in"), unique_name("out"), unique_name("group")
    await create_topics(kafka_bootstrap, {source: 2, sink: 2})
    await produce(kafka_bootstrap, source, [(f"k{i}".encode(), b"x") for i in range(12)])

    # consume-transform-produce with offsets committed inside the transaction (EOS)
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("eos")
    )
    await consumer.start()
    await producer.start()
    try:
        seen = 0
        async with asyncio.timeout(60):
            while seen < 12:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, messages in batch.items():
                    seen += len(messages)
                    async with producer.transaction():
                        for m in messages:
                            await producer.send(sink, m.value, key=m.key)
                        await producer.send_offsets_to_transaction(
                            {tp: messages[-1].offset + 1}, group
                        )
    finally:
        await producer.stop()
        await consumer.stop()

    ends = await end_offsets(kafka_bootstrap, source)
    assert await committed_offsets(kafka_bootstrap, group, source) == ends
    assert await tool_committed_offsets(kafka_bootstrap, group, source) == ends
    assert len(await consume_all(kafka_bootstrap, sink)) == 12

    # and a plain consumer commit, partly done: the tool shows exactly what was committed
    plain = unique_name("plain")
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=plain)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(source, 0), TopicPartition(source, 1)])
        await consumer.commit({TopicPartition(source, 0): 1, TopicPartition(source, 1): 2})
    finally:
        await consumer.stop()
    assert await committed_offsets(kafka_bootstrap, plain, source) == {0: 1, 1: 2}
    assert await tool_committed_offsets(kafka_bootstrap, plain, source) == {0: 1, 1: 2}
    assert await tool_committed_offsets(kafka_bootstrap, unique_name("none"), source) == {}


@integration
async def test_compacted_topic_can_be_created(kafka_bootstrap: str) -> None:
    topic = unique_name("compact")
    await create_topics(
        kafka_bootstrap, {topic: 1}, config={"cleanup.policy": "compact", "segment.ms": "100"}
    )
    await produce(kafka_bootstrap, topic, [(b"k", b"1"), (b"k", b"2"), (b"j", b"3")])
    assert [m.value for m in await consume_all(kafka_bootstrap, topic)][-1] == b"3"


# ------------------------------------------------------------------------ lifecycle


@integration
@pytest.mark.slow
async def test_lifecycle_kill_restart_stop() -> None:
    kafka = LocalKafka()
    await asyncio.to_thread(kafka.start)
    try:
        bootstrap = kafka.bootstrap_servers
        state = kafka.state_dir
        assert state is not None and (state / "kafka.log").exists()
        assert await asyncio.to_thread(kafka.start) == bootstrap  # idempotent
        topic = unique_name("survives")
        await create_topics(bootstrap, {topic: 1})
        await produce(bootstrap, topic, [(b"k", b"before-crash")])

        kafka.kill_hard()
        assert not kafka.running
        assert await asyncio.to_thread(kafka.start) == bootstrap  # same broker, same data
        assert [m.value for m in await consume_all(bootstrap, topic)] == [b"before-crash"]

        proc = await asyncio.to_thread(
            kafka.run_tool,
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server", bootstrap, "--describe", "--topic", topic,
        )  # fmt: skip
        assert proc.returncode == 0 and topic in proc.stdout
        with pytest.raises(LocalKafkaError, match="failed"):
            await asyncio.to_thread(
                kafka.run_tool, CONSUMER_GROUP_COMMAND, "--no-such-option", check=True
            )
    finally:
        kafka.stop()
    kafka.stop()  # idempotent
    assert not kafka.running
    assert not state.exists()  # a temporary state dir is removed


@integration
def test_start_errors_are_clear() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        kafka = LocalKafka(port=port)
        with pytest.raises(LocalKafkaError, match=f"port in use: 127.0.0.1:{port}"):
            kafka.start()
        kafka.stop()
    kafka = LocalKafka(broker_config={"num.io.threads": "0"})
    with pytest.raises(LocalKafkaError, match=r"(?s)failed.*num\.io\.threads"):
        kafka.start()
    kafka.stop()
    kafka = LocalKafka(start_timeout_s=0.2)
    with pytest.raises(LocalKafkaError, match=r"did not answer a metadata request") as info:
        kafka.start()
    assert "kafka.out" in str(info.value) or "kafka.log" in str(info.value)
    assert not kafka.running
    kafka.stop()


@integration
@pytest.mark.slow
def test_cli_start_status_stop(tmp_path: Path) -> None:
    state = tmp_path / "kafka"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connector.localkafka", *args, "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
            check=False,
        )

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        assert bootstrap.startswith("127.0.0.1:")
        assert (state / "bootstrap").read_text().strip() == bootstrap
        assert localkafka.metadata_broker_count(bootstrap) == 1
        again = cli("start")  # already running: same address
        assert again.stdout.strip() == bootstrap
        status = cli("status")
        assert status.returncode == 0 and bootstrap in status.stdout
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    after = cli("status")
    assert after.returncode == 1 and "not running" in after.stdout


@pytest.mark.integration
def test_cli_stop_then_start_keeps_the_data(tmp_path: Path) -> None:
    """A stopped broker started again from its state dir has the same topics and records
    (the storage is formatted only the first time)."""
    state = tmp_path / "kafka"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connector.localkafka", *args, "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
            check=False,
        )

    async def write(bootstrap: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic("kept", 1, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("kept", b"survives a restart")
        finally:
            await producer.stop()

    async def read(bootstrap: str) -> list[bytes]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition("kept", 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            batch = await consumer.getmany(tp, timeout_ms=10_000)
            return [m.value for m in batch.get(tp, [])]
        finally:
            await consumer.stop()

    first = cli("start")
    try:
        assert first.returncode == 0, first.stderr
        asyncio.run(write(first.stdout.strip()))
        assert cli("stop").returncode == 0
        second = cli("start")
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == first.stdout.strip()  # same ports
        assert asyncio.run(read(second.stdout.strip())) == [b"survives a restart"]
    finally:
        cli("stop")
