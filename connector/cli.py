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

from connector import __version__, proxy
from connector.config import ENV_PREFIX, ConnectorSettings, load_settings, mask_url
from connector.errors import ConfigError
from connector.logs import configure_logging

log = logging.getLogger(__name__)
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Kafka domain events -> Mindset Threads API conversations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the connector (a consumer group member)")
    run.add_argument("--config", type=Path, default=Path("config/connector.yaml"))

    check = sub.add_parser("check-config", help="validate a config file, field by field")
    check.add_argument("--config", type=Path, default=Path("config/connector.yaml"))

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

        return simulator_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "run":
        try:
            settings = load_settings(args.config)
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


def check_config(path: Path) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        sys.stderr.write(f"{path}: {exc}\n")
        return EXIT_CONFIG
    k, d, a = settings.kafka, settings.delivery, settings.api
    try:
        extras = environment_lines(settings)
    except ConfigError as exc:
        sys.stderr.write(f"{path}: {exc}\n")
        return EXIT_CONFIG
    sys.stdout.write(
        f"{path}: OK\n"
        f"  kafka: {k.bootstrap_servers} group={k.group_id} inputs={','.join(k.input_topics)}"
        f" results={k.results_topic} dead-letters={k.dead_letter_topic}\n"
        f"  delivery: {d.mode.value}, ordering {d.ordering.value}, dedup {settings.dedup.store}\n"
        f"  api: {a.base_url} rate {a.rate_limit_per_s}/s for the group,"
        f" {a.max_in_flight} in flight\n"
        f"  routes: {len(settings.routes)}\n"
    )
    for app in settings.app_uids():
        own, api = a.apps.get(app), a.for_app(app)
        key = "own key" if own is not None and own.has_key else "default key"
        sys.stdout.write(
            f"  app {app}: {key}, rate {api.rate_limit_per_s}/s for the group,"
            f" {api.max_in_flight} in flight\n"
        )
    sys.stdout.writelines(f"  {line}\n" for line in extras)
    return 0


def environment_lines(settings: ConnectorSettings) -> list[str]:
    """What the environment adds to the file: the API's egress proxy, the Kafka OAuth
    client, tracing. Mounted secret files are named, not read (like api.api_key_file: they
    exist in the pod, not where a rendered chart is checked); start-up reads them and
    stops naming the field. Raises ConfigError for an environment proxy URL that is not
    one, as start-up would."""
    found = proxy.resolve(settings.api, read_credentials=False)
    lines = [f"api proxy: {found.describe() if found is not None else 'none (direct)'}"]
    k = settings.kafka
    if k.sasl_mechanism == "OAUTHBEARER":
        scope = f", scope {k.oauth_scope!r}" if k.oauth_scope else ""
        source = k.oauth_client_secret_file or f"{ENV_PREFIX}KAFKA__OAUTH_CLIENT_SECRET"
        lines.append(
            f"kafka login: OAUTHBEARER, client {k.oauth_client_id} at {k.oauth_token_url}"
            f"{scope}, secret from {source}"
        )
    lines.append(f"tracing: {tracing_line(settings)}")
    return lines


def tracing_line(settings: ConnectorSettings) -> str:
    """Where spans would go and how they are sampled (the OTEL_* environment's values)."""
    if not settings.tracing.enabled:
        return "off"
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off (OTEL_SDK_DISABLED=true)"
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"
    )
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    if env.get("OTEL_TRACES_SAMPLER_ARG"):
        sampler += f" ({env['OTEL_TRACES_SAMPLER_ARG']})"
    service = env.get("OTEL_SERVICE_NAME") or settings.tracing.service_name
    return f"on, service {service}, OTLP/HTTP to {mask_url(endpoint)}, sampler {sampler}"


async def run(settings: ConnectorSettings) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once."""
    from connector.app import Connector

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now; uncommitted work will be replayed")
            os._exit(128 + signum)
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

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
