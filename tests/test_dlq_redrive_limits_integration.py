"""A redrive cannot loop: dead letters that keep failing are copied back at most
``--max-redrives`` times (3 by default), and codes that mean the record itself is wrong
are skipped unless named; a terminal shows a progress bar. On a real broker, with the
connector dead-lettering the copies again."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import orjson
import pytest

from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import Names, event, make_settings, running
from tests.kafka_helpers import consume_all, produce
from tests.test_dlq_integration import cli, config_file

pytestmark = pytest.mark.integration


async def wait_for_dead_letters(bootstrap: str, topic: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(await consume_all(bootstrap, topic)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} dead letters after 60 s"
        await asyncio.sleep(0.3)


async def redrive_on_a_terminal(config: Path) -> tuple[int, str, str]:
    """``connector dlq redrive`` with stderr on a pseudo-terminal (as an operator runs it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADS_CONNECTOR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", "dlq", "redrive", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    terminal = b""
    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    return proc.returncode or 0, out.decode(), terminal.decode(errors="replace")


async def test_redrives_stop_after_the_limit_and_defects_stay(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = Names.fresh("loop")
    async with ThreadsApiSimulator(SimulatorSettings(seed=5)) as sim:
        settings = make_settings(kafka_bootstrap, sim.base_url, names, partitions=1)
        config = config_file(settings, tmp_path)
        unrouted = [(b"u", orjson.dumps({"id": f"nr-{i}", "type": "order.lost"})) for i in (1, 2)]
        defect = [(b"u", event("bad-user", user="not allowed!"))]  # invalid_request
        async with running(settings):
            await produce(kafka_bootstrap, names.input, unrouted + defect)
            await wait_for_dead_letters(kafka_bootstrap, names.dead, 3)

            # the first redrive on a terminal: a progress bar, then the summary
            code, out, terminal = await redrive_on_a_terminal(config)
            assert code == 0, out + terminal
            assert "redrive: 100%" in terminal and "copied 2" in terminal, terminal
            assert "read 3 dead letter(s); copied 2" in out
            assert "not redrivable unless named with --code: invalid_request: 1" in out
            await wait_for_dead_letters(kafka_bootstrap, names.dead, 5)

            copied = []
            for total in (7, 9, None):
                report = await cli(capsys, "redrive", "--config", str(config))
                copied.append(report["copied"])
                if total is not None:
                    await wait_for_dead_letters(kafka_bootstrap, names.dead, total)
    # copied at redrive #2 and #3; the third copies failed again: left
    assert copied == [2, 2, 0]
    assert report["outcomes"]["max_redrives"] == 2
    assert report["outcomes"]["not_redrivable"] == 1  # still there: named, it would go
    assert "copy" not in report["outcomes"]
    assert report["filter"]["maxRedrives"] == 3
    dead = await consume_all(kafka_bootstrap, names.dead)
    counts = sorted(
        int(dict(m.headers).get("dlq-redrive-count", b"0")) for m in dead if m.key == b"u"
    )
    assert counts == [0, 0, 0, 1, 1, 2, 2, 3, 3]
