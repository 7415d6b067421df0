"""``connector dlq`` arguments: a --code or --stage no dead letter can have is refused with
the known ones (a typo matched nothing and exited 0, as if the topic were empty)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from connector.cli import main

CONFIG = {
    "kafka": {"bootstrap_servers": "127.0.0.1:1"},
    "routes": [
        {
            "event_type": "order.shipped",
            "app_uid": "demo-app",
            "agent_uid": "agent-orders",
            "message_template": "Order shipped",
            "user": {"path": "user"},
        }
    ],
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["redrive", "inspect"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--code", "no_routes"], "--code no_routes: no dead letter has this code"),
        (["--code", "no_route,invalid_jsn"], "(did you mean invalid_json?)"),
        (["--stage", "bogus"], "--stage bogus: not a stage; the stages are parse, validate"),
        (["--stage", "apii"], "(did you mean api?)"),
    ],
)
def test_unknown_codes_and_stages_are_refused(
    config: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    args: list[str],
    message: str,
) -> None:
    assert main(["dlq", command, "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_known_codes_are_listed(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["dlq", "redrive", "--config", str(config), "--code", "nope"])
    err = capsys.readouterr().err
    for code in ("no_route", "invalid_request", "expired", "http_<status>"):
        assert code in err


def test_max_redrives_must_be_positive(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dlq", "redrive", "--config", str(config), "--max-redrives", "0"])
    assert "not a positive whole number" in capsys.readouterr().err
