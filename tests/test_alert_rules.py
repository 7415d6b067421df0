"""``promtool test rules`` on every alert unit-test file in tests/rules/ (one file per
concern, so rules added later bring their own), and the chart's job selector."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prometheus_helpers import ROOT, promtool

RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yaml"))


@pytest.mark.parametrize("unit", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
async def test_promtool_test_rules(unit: Path) -> None:
    result = await promtool("test", "rules", unit.name, cwd=unit.parent)
    assert result.returncode == 0, result.output
    assert "SUCCESS" in result.output, result.output


def test_the_presence_alerts_select_the_connector_by_job() -> None:
    """The chart replaces this selector with the release's job and namespace."""
    text = (ROOT / "helm" / "threads-connector" / "rules" / "alerts.yaml").read_text()
    assert 'absent(up{job="threads-connector"} == 1)' in text
    assert 'absent(threads_connector_build_info{job="threads-connector"})' in text
