"""The command line's own surface: program names and the documented exit codes."""

from __future__ import annotations

import pytest

from connector.cli import main


def test_simulate_api_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate-api", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: connector simulate-api")


def test_check_config_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check-config", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 everything checked is fine; 2 the configuration" in out
    assert "3 an online check failed" in out
    assert "--online" in out and "--json" in out
