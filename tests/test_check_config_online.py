"""``connector check-config --online`` against a real broker and the API simulator: what
``run`` would meet (missing topics, unsound changelogs, a wrong API path or key, missing
ACLs) is found before it starts, without creating or committing anything."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from connector.config import ConnectorSettings
from connector.dedup import changelog_topic
from connector.localkafka import LocalKafka
from connector.localkafka.ports import free_ports
from connector.preflight import Check, Status
from connector.preflight_online import online_checks
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import API_KEY, Names, make_settings
from tests.kafka_helpers import create_topics

pytestmark = pytest.mark.integration


def failures(checks: list[Check]) -> list[str]:
    return [f"{c.name}: {c.detail}" for c in checks if c.status is Status.FAIL]


def find(checks: list[Check], text: str) -> Check:
    matching = [c for c in checks if text in c.detail]
    assert matching, (text, [c.detail for c in checks])
    return matching[0]


async def topic_list(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_sound_setup_passes_and_nothing_is_created(kafka_bootstrap: str) -> None:
    names = Names.fresh("pre-ok")
    await create_topics(kafka_bootstrap, {names.input: 2})
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names)
        checks = await online_checks(settings)
        assert failures(checks) == []
        assert sim.store.all() == []
    find(checks, f"input topic {names.input} exists (2 partitions)")
    find(checks, f"topic {names.results} does not exist; run will create it")
    changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
    find(checks, f"topic {changelog} does not exist; run will create it (2 partitions")
    find(checks, f"group {names.group}: offsets can be committed in a transaction")
    find(checks, "app demo-app: POST ")
    find(checks, "answered 400 to an invalid body: path and key accepted")
    after = await topic_list(kafka_bootstrap)
    assert names.results not in after and changelog not in after


async def test_missing_and_unsound_topics_are_named(kafka_bootstrap: str) -> None:
    names = Names.fresh("pre-topics")
    settings = make_settings(
        kafka_bootstrap,
        "http://127.0.0.1:1",
        names,
        kafka={"create_topics": False, "create_input_topics": False},
    )
    changelog = changelog_topic(names.group, names.input, settings.dedup.changelog_suffix)
    checks = await online_checks(settings)
    find(checks, f"input topic {names.input} does not exist (kafka.input_topics)")
    find(checks, f"topic {names.results} does not exist and kafka.create_topics is false")
    assert names.input not in await topic_list(kafka_bootstrap)  # not auto-created by the check
    await create_topics(kafka_bootstrap, {names.input: 3, names.results: 3, names.dead: 3})
    await create_topics(kafka_bootstrap, {changelog: 2}, config={"cleanup.policy": "delete"})
    checks = await online_checks(settings)
    bad = find(checks, f"topic {changelog}: 2 partitions, its input topic has 3")
    assert bad.status is Status.FAIL and "cleanup.policy=delete must include compact" in bad.detail
    small = make_settings(
        kafka_bootstrap, "http://127.0.0.1:1", names, kafka={"max_request_size": 4_000_000}
    )
    checks = await online_checks(small)
    find(
        checks, f"topic {names.results}: max.message.bytes=1048588 is below kafka.max_request_size"
    )


@pytest.mark.parametrize(
    ("suffix", "key", "expected"),
    [
        ("/api/v1", API_KEY, "answered 404: wrong path; api.base_url is the API's origin"),
        ("", "someone-elses-key", "answered 403: the API key does not belong to this app"),
    ],
    ids=["wrong-path", "wrong-key"],
)
async def test_the_api_path_and_key_are_probed(
    kafka_bootstrap: str, suffix: str, key: str, expected: str
) -> None:
    names = Names.fresh("pre-api")
    await create_topics(kafka_bootstrap, {names.input: 1})
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        settings = make_settings(
            kafka_bootstrap, sim.base_url + suffix, names, api={"api_key": key}
        )
        checks = await online_checks(settings)
        assert sim.store.all() == []
    assert failures(checks) == [f"api: {find(checks, expected).detail}"]
    assert key not in str(checks)


async def test_unreachable_brokers() -> None:
    settings = make_settings(f"127.0.0.1:{free_ports(1)[0]}", "http://127.0.0.1:1", Names.fresh())
    checks = await online_checks(settings, timeout_s=5)
    find(checks, "unreachable: connection refused")
    assert checks[0].status is Status.FAIL


def cli_config(settings: ConnectorSettings, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    data: dict[str, Any] = settings.model_dump(mode="json", exclude_none=True)
    data["api"].pop("api_key", None)
    data["api"].pop("apps", None)
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("THREADS_CONNECTOR_")}
    return path, {**env, "THREADS_CONNECTOR_API__API_KEY": API_KEY}


async def connector_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_exit_codes_and_json(kafka_bootstrap: str, tmp_path: Path) -> None:
    names = Names.fresh("pre-cli")
    await create_topics(kafka_bootstrap, {names.input: 1})
    async with ThreadsApiSimulator(SimulatorSettings(seed=3)) as sim:
        good, env = cli_config(make_settings(kafka_bootstrap, sim.base_url, names), tmp_path)
        code, out, err = await connector_cli(
            "check-config", "--online", "--config", str(good), env=env
        )
        assert code == 0, out + err
        assert "ok      api: app demo-app" in out
        wrong = make_settings(kafka_bootstrap, sim.base_url + "/api/v1", names)
        path, env = cli_config(wrong, tmp_path)
        code, out, err = await connector_cli(
            "check-config", "--online", "--json", "--config", str(path), env=env
        )
    assert code == 3, out + err
    document = json.loads(out)
    assert document["exit_code"] == 3 and document["ok"] is False
    failed = [c for c in document["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["api"]
    assert "/api/v1/api/v1/appuid/demo-app/threads answered 404" in failed[0]["detail"]


# -- permissions: a broker with an authorizer, a SASL user with no ACLs -----------------

USER, PASSWORD = "preflight-user", "preflight-pw-5f1"


@pytest.fixture(scope="module")
def acl_kafka() -> Iterator[LocalKafka]:
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    kafka = LocalKafka(
        listeners={"SASL": "SASL_PLAINTEXT"},
        scram_users={USER: PASSWORD},
        broker_config={
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",  # the PLAINTEXT and controller listeners
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl.scram-sha-512.sasl.jaas.config": jaas,
        },
    )
    with kafka:
        yield kafka


def allow(kafka: LocalKafka, *args: str) -> None:
    kafka.run_tool(
        "org.apache.kafka.tools.AclCommand", "--bootstrap-server", kafka.bootstrap_servers,
        "--add", "--allow-principal", f"User:{USER}", *args, check=True,
    )  # fmt: skip


async def test_missing_acls_are_named(acl_kafka: LocalKafka, tmp_path: Path) -> None:
    names = Names.fresh("pre-acl")
    await create_topics(acl_kafka.bootstrap_servers, {names.input: 1})
    password = tmp_path / "password"
    password.write_text(PASSWORD, encoding="utf-8")
    sasl = {
        "bootstrap_servers": acl_kafka.listener_address("SASL"),
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password_file": str(password),
    }
    settings = make_settings("x:1", "http://127.0.0.1:1", names, kafka=sasl)
    checks = await online_checks(settings, timeout_s=20)
    find(checks, f"input topic {names.input}: not authorized (missing ACL: Describe on Topic")
    allow(acl_kafka, "--operation", "Describe", "--operation", "Read", "--topic", names.input)
    allow(acl_kafka, "--operation", "Create", "--topic", names.results, "--topic", names.dead)
    prefix = settings.delivery.transactional_id_prefix
    checks = await online_checks(settings, timeout_s=20)
    find(checks, f"group {names.group}: not authorized (missing ACL: Describe and Read on Group")
    find(
        checks,
        f"not authorized (missing ACL: Write and Describe on TransactionalId (PREFIXED) {prefix}",
    )
    find(checks, f"topic {names.results} does not exist; run will create it")
    allow(acl_kafka, "--operation", "Describe", "--operation", "Read", "--group", names.group)
    allow(
        acl_kafka, "--operation", "Write", "--operation", "Describe",
        "--transactional-id", prefix, "--resource-pattern-type", "prefixed",
    )  # fmt: skip
    checks = await online_checks(settings, timeout_s=20)
    assert [f for f in failures(checks) if not f.startswith(("api:", "topics: topic "))] == []
