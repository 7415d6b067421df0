"""The dedup changelog's configuration rules (connector.changelog_contract)."""

from __future__ import annotations

from connector.changelog_contract import breaches, corrected

DAY_S = 86_400.0


def settings_of(topic: str, config: dict[str, str]) -> list[tuple[str, str]]:
    return [(b.setting, b.wanted) for b in breaches(topic, config, DAY_S)]


def test_the_created_configuration_is_sound() -> None:
    config = {"cleanup.policy": "compact,delete", "retention.ms": "86400000"}
    assert breaches("c", config | {"retention.bytes": "-1"}, DAY_S) == []


def test_compact_alone_and_infinite_retention_are_sound() -> None:
    assert breaches("c", {"cleanup.policy": "compact", "retention.ms": "1000"}, DAY_S) == []
    assert breaches("c", {"cleanup.policy": "compact,delete", "retention.ms": "-1"}, DAY_S) == []


def test_a_retention_shorter_than_the_window_is_named() -> None:
    found = breaches("c", {"cleanup.policy": "compact,delete", "retention.ms": "5000"}, DAY_S)
    assert [(b.setting, b.value, b.wanted) for b in found] == [("retention.ms", "5000", "86400000")]
    assert "dedup changelog c: retention.ms=5000 deletes entries" in str(found[0])


def test_delete_without_compact_and_a_size_bound_are_named() -> None:
    config = {"cleanup.policy": "delete", "retention.ms": "86400000", "retention.bytes": "1000"}
    assert settings_of("c", config) == [
        ("cleanup.policy", "compact,delete"),
        ("retention.bytes", "-1"),
    ]


def test_the_correction_keeps_the_other_overrides() -> None:
    found = breaches("c", {"cleanup.policy": "compact,delete", "retention.ms": "5"}, DAY_S)
    fixed = corrected({"segment.ms": "600000", "retention.ms": "5"}, found)
    assert fixed == {"segment.ms": "600000", "retention.ms": "86400000"}


def test_unreadable_settings_are_not_judged() -> None:
    assert breaches("c", {}, DAY_S) == []
    assert breaches("c", {"cleanup.policy": "delete,compact", "retention.ms": "x"}, DAY_S) == []
