"""The README's first command: ``connector demo`` runs end to end and shows its results.

It once stopped at start-up: a configuration check added later refused the demo's own
overrides (a drain shorter than a call may take), and no test ran the demo."""

from __future__ import annotations

import os
import signal
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


def localkafka_processes(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (the broker's state folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_sigterm_stops_the_kept_demo_and_its_broker(tmp_path: Path) -> None:
    """``demo --keep-running`` ended by SIGTERM (a container stop, a CI job's timeout) left
    the local broker's JVM running and its temporary folder behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADS_CONNECTOR_")}
    env["TMPDIR"] = str(tmp_path)  # the broker's temporary state folder goes here
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "demo", "--keep-running"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # blocks until the demo prints; the timeout below bounds it
            lines.append(line)
            if line.startswith("running;"):
                break
        else:
            pytest.fail("the demo ended before it was running:\n" + "".join(lines))
        states = list(tmp_path.glob("localkafka-*"))
        assert len(states) == 1, states
        assert localkafka_processes(str(states[0])), "no broker JVM found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert localkafka_processes(str(states[0])) == []
    assert not states[0].exists()
