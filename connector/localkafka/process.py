"""Broker processes by pid: signalling a process group, reading a state dir's pid file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _read_pid(state: Path) -> int | None:
    """The pid in ``state/kafka.pid`` if that process is still this state dir's broker."""
    try:
        pid = int((state / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        args = subprocess.run(
            ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None
    props = str(state.resolve() / "server.properties")
    return pid if "kafka.Kafka" in args and props in args else None
