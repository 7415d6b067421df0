"""``python -m connector.localkafka start|stop|status|fetch``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiokafka.errors import KafkaError

from connector.localkafka.broker import LocalKafka
from connector.localkafka.common import DEFAULT_STATE_DIR, KAFKA_VERSION, LocalKafkaError
from connector.localkafka.jars import ensure_jars
from connector.localkafka.process import _read_pid, _signal_group
from connector.localkafka.readiness import metadata_broker_count


def _cli_stop(state: Path, timeout_s: float = 30.0) -> bool:
    pid = _read_pid(state)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _read_pid(state) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if _read_pid(state) == pid:
        _signal_group(pid, signal.SIGKILL)
    for name in ("kafka.pid", "bootstrap"):
        (state / name).unlink(missing_ok=True)
    return True


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connector.localkafka",
        description=f"A local Apache Kafka {KAFKA_VERSION} broker (KRaft, one node) on loopback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("start", "start a broker in the background; prints its bootstrap address"),
        ("stop", "stop the broker of a state dir"),
        ("status", "print the bootstrap address if running (exit 1 if not)"),
        ("fetch", "only download Kafka's jars into the cache (CI pre-warming)"),
    ]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache-dir", type=Path, default=None, help="jar cache root")
        if name != "fetch":
            cmd.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        if name == "start":
            cmd.add_argument("--port", type=int, default=None, help="client port (default: free)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "fetch":
            _out(str(ensure_jars(args.cache_dir)))
            return 0
        state: Path = args.state_dir.expanduser().resolve()
        bootstrap_file = state / "bootstrap"
        if args.command == "status":
            if _read_pid(state) is None or not bootstrap_file.is_file():
                _out("not running")
                return 1
            bootstrap = bootstrap_file.read_text().strip()
            brokers = metadata_broker_count(bootstrap)
            _out(f"running {bootstrap} (pid {_read_pid(state)}, {brokers} broker)")
            return 0
        if args.command == "stop":
            _out("stopped" if _cli_stop(state) else "not running")
            return 0
        if _read_pid(state) is not None and bootstrap_file.is_file():
            _out(bootstrap_file.read_text().strip())
            return 0
        kafka = LocalKafka(state, port=args.port, cache_dir=args.cache_dir)
        kafka._create_cds = False
        bootstrap = kafka.start()
        kafka.detach()
        _out(bootstrap)
        return 0
    except (LocalKafkaError, KafkaError, OSError, TimeoutError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
