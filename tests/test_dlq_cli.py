"""``connector dlq`` arguments: filters, rates, and no API key needed (none left behind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.cli import build_parser
from connector.cli import main as cli_main
from connector.dlq.cli import API_KEY_ENV, build_filter, load_for_tools


def test_filters_and_rate_parse() -> None:
    args = build_parser().parse_args(
        ["dlq", "redrive", "--code", "no_route,http_422", "--code", "expired", "--stage",
         "route", "--since", "2026-11-27", "--rate", "50/s", "--dry-run"]
    )  # fmt: skip
    flt = build_filter(args)
    assert flt.codes == {"no_route", "http_422", "expired"} and flt.stages == {"route"}
    assert flt.since_ms == 1_795_737_600_000
    assert args.rate == 50.0 and args.dry_run and not args.again


@pytest.mark.parametrize(
    "bad",
    [
        ["--rate", "0"],
        ["--rate", "fast"],
        ["--since", "soon"],
        ["--since", "99999999999d"],  # OverflowError: a traceback, not a usage error
        ["--until", "1000000d"],  # before the year 1: OverflowError too
    ],
)
def test_bad_arguments_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "redrive", *bad])


def test_no_api_key_needed_and_none_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(
        "routes:\n  - {event_type: x, app_uid: a, agent_uid: g, message_template: m,"
        " user: {path: u}}\n"
    )
    settings = load_for_tools(config)
    assert settings.kafka.dead_letter_topic == "thread-dead-letters"
    assert API_KEY_ENV not in os.environ


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dlq", "inspect", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
