"""The changelog contract under a broker's authorizer: a connector user allowed to read
and write its topics but not to read or change their configuration.

Before: without DescribeConfigs the changelog's configuration came back empty and was
"not judged", so a changelog with ``retention.ms=5000`` (empty 22 s later, every replay
after a restart a second thread) was accepted without a word; without AlterConfigs the
refusal named the breach but not why ``create_topics: true`` had not corrected it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.dedup import changelog_topic
from connector.errors import ConfigError
from connector.localkafka import LocalKafka
from connector.topics import TopicManager
from tests.harness import Names, make_settings
from tests.kafka_helpers import create_topics
from tests.test_check_config_online import PASSWORD, USER, acl_kafka, allow

pytestmark = pytest.mark.integration
__all__ = ["acl_kafka"]  # the module-scoped broker with an authorizer
TTL_S = 3600


async def refusal(kafka: LocalKafka, tmp_path: Path, *operations: str) -> str:
    """The start-up topic check's refusal for a changelog with a 5 s retention, the user
    allowed ``operations`` on the test's topics (by their common prefix) and group."""
    names = Names.fresh("aclcl")
    prefix = names.group.rsplit("-", 1)[0]
    changelog = changelog_topic(names.group, names.input, "dedup-changelog")
    await create_topics(kafka.bootstrap_servers, {names.input: 1, names.results: 1, names.dead: 1})
    await create_topics(
        kafka.bootstrap_servers,
        {changelog: 1},
        config={"cleanup.policy": "compact,delete", "retention.ms": "5000"},
    )
    ops = [arg for op in ("Describe", "Read", "Write", *operations) for arg in ("--operation", op)]
    allow(kafka, *ops, "--topic", prefix, "--resource-pattern-type", "prefixed")
    allow(kafka, "--operation", "Describe", "--operation", "Read", "--group", names.group)
    password = tmp_path / "password"
    password.write_text(PASSWORD, encoding="utf-8")
    sasl = {
        "bootstrap_servers": kafka.listener_address("SASL"),
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password_file": str(password),
    }
    settings = make_settings("x:1", "http://127.0.0.1:1", names, partitions=1, kafka=sasl,
                             dedup={"ttl_s": TTL_S})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        async with TopicManager(settings) as topics:
            await topics.ensure()
    message = str(info.value)
    assert changelog in message, message
    return message


async def test_a_changelog_whose_configuration_cannot_be_read_is_refused(
    acl_kafka: LocalKafka, tmp_path: Path
) -> None:
    message = await refusal(acl_kafka, tmp_path)
    assert "DescribeConfigs" in message, message


async def test_a_correction_the_acls_refuse_says_so(acl_kafka: LocalKafka, tmp_path: Path) -> None:
    message = await refusal(acl_kafka, tmp_path, "DescribeConfigs")
    assert "retention.ms=5000" in message, message
    assert "AlterConfigs" in message, message
