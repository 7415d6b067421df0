"""The command line: ``connector run | check-config | simulate-api | demo | dlq``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from connector import __version__
from connector.config import ConnectorSettings
from connector.errors import ConfigError
from connector.logs import configure_logging
from connector.preflight import load_checked

log = logging.getLogger(__name__)
EXIT_CONFIG = 2
EXIT_DRAIN_OVERRUN = 3  # the drain outlived delivery.drain_timeout_s: exited regardless


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Kafka domain events -> Mindset Threads API conversations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the connector (a consumer group member)")
    run.add_argument("--config", type=Path, default=Path("config/connector.yaml"))

    check = sub.add_parser(
        "check-config",
        help="validate a config file, field by field (--online: brokers, topics, ACLs, API)",
        description="Exit codes: 0 everything checked is fine; 2 the configuration (file, "
        "environment or a file it names) is refused; 3 an online check failed.",
    )
    check.add_argument("--config", type=Path, default=Path("config/connector.yaml"))
    check.add_argument(
        "--online",
        action="store_true",
        help="also check the brokers, topics, group and transactional-id permissions, and "
        "each app's API path and key (changes nothing)",
    )
    check.add_argument("--json", action="store_true", help="one JSON document on stdout")
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="do not read the secret and certificate files the settings name (a config "
        "rendered for a pod, checked where those files are not mounted)",
    )

    sub.add_parser(
        "simulate-api",
        help="start the Threads API simulator (see: connector simulate-api --help)",
        add_help=False,
    )

    demo = sub.add_parser(
        "demo", help="local Kafka + simulator + sample events, end to end, results shown"
    )
    demo.add_argument("--config", type=Path, default=Path("config/connector.yaml"))
    demo.add_argument("--events", type=Path, default=Path("config/samples/events.jsonl"))
    demo.add_argument("--keep-running", action="store_true", help="keep everything up until Ctrl-C")
    demo.add_argument(
        "--bootstrap-servers", help="use this Kafka instead of starting the local broker"
    )
    from connector.dlq.cli import add_parser as add_dlq_parser

    add_dlq_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["simulate-api"]:
        from connector.simulator.cli import main as simulator_main

        return simulator_main(args_list[1:], prog="connector simulate-api")
    args = build_parser().parse_args(args_list)
    if args.command == "check-config":
        from connector.check_config import check_config

        return check_config(
            args.config, online=args.online, as_json=args.json, files=not args.skip_files
        )
    if args.command == "run":
        try:
            settings = load_checked(args.config)
        except ConfigError as exc:
            sys.stderr.write(f"connector: {exc}\n")
            return EXIT_CONFIG
        configure_logging(settings.logging.level, settings.logging.format)
        # what start-up built (modules, pydantic schemas: most of the heap) lives as long as
        # the process: out of the collector's sight, a full collection takes a few ms
        # instead of tens, which would hold every call in flight. Collections of the young
        # generation every 50,000 allocations instead of 700, and of the older ones
        # rarely: what lives long (dedup entries, connections) grows while events flow, and
        # each full collection walked it all (bench/latency.py: added latency p99 172 and
        # 50 ms with the defaults, 51 and 38 ms with these, side by side)
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        return asyncio.run(run(settings))
    if args.command == "dlq":
        from connector.dlq.cli import main as dlq_main

        configure_logging("WARNING", "text")
        return dlq_main(args)
    if args.command == "demo":
        from connector.demo import run_demo

        configure_logging("ERROR", "text")
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # start-up coordinator noise
        return asyncio.run(
            run_demo(args.config, args.events, args.keep_running, args.bootstrap_servers)
        )
    return EXIT_CONFIG


async def run(settings: ConnectorSettings) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once, and so does the end of
    ``delivery.drain_timeout_s`` after the first (the connector's own drain returns before
    it: this is the bound when something it awaits does not give way)."""
    from connector.app import Connector

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now; uncommitted work will be replayed")
            os._exit(128 + signum)
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()
        loop.call_later(settings.delivery.drain_timeout_s, drain_overrun)

    def drain_overrun() -> None:
        log.error(
            "the drain did not end within delivery.drain_timeout_s (%gs): exiting now; "
            "uncommitted work will be replayed",
            settings.delivery.drain_timeout_s,
        )
        logging.shutdown()
        os._exit(EXIT_DRAIN_OVERRUN)

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, on_signal, signum)
    try:
        await Connector(settings).run(stop)
    except ConfigError as exc:
        log.error("configuration problem: %s", exc)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
