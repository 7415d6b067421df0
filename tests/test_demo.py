"""The README's first command: ``connector demo`` runs end to end and shows its results.

It once stopped at start-up: a configuration check added later refused the demo's own
overrides (a drain shorter than a call may take), and no test ran the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_end_to_end(kafka_bootstrap: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADS_CONNECTOR_")}
    done = subprocess.run(
        [sys.executable, "-m", "connector.cli", "demo", "--bootstrap-servers", kafka_bootstrap],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "results (6 records on the results topic)" in out, out
    assert "dead letters (3 records, original bytes kept)" in out, out
    assert "simulator: 6 threads created for 6 event ids" in out, out
