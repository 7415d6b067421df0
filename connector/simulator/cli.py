"""Command line: serve the simulator until SIGINT/SIGTERM.

    python -m connector.simulator --port 8080 --latency lognormal --latency-ms 800 \\
        --latency-p99-ms 6000 --error-rate-503 0.02 --rate-limit-per-s 50

Settings come from ``--config FILE`` (YAML, the fields of ``SimulatorSettings``), then the
flags. Exit codes: 0 after a signal, 1 if the port cannot be bound, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any, get_args

import yaml

from connector.simulator.server import ThreadsApiSimulator
from connector.simulator.settings import (
    DEFAULT_API_KEY,
    DEFAULT_APP_UID,
    HostileMode,
    SimulatorSettings,
    load_yaml,
)
from connector.simulator.tls import make_private_ca

log = logging.getLogger(__name__)

# flag dest -> (section or None for top level, settings field)
_OVERRIDES: dict[str, tuple[str | None, str]] = {
    "host": (None, "host"),
    "port": (None, "port"),
    "seed": (None, "seed"),
    "rate_limit_per_s": (None, "rate_limit_per_s"),
    "rate_limit_burst": (None, "rate_limit_burst"),
    "access_log": (None, "access_log"),
    "latency": ("latency", "distribution"),
    "latency_ms": ("latency", "median_ms"),
    "latency_p99_ms": ("latency", "p99_ms"),
    "latency_min_ms": ("latency", "min_ms"),
    "latency_max_ms": ("latency", "max_ms"),
    "error_rate_502": ("faults", "error_rate_502"),
    "error_rate_503": ("faults", "error_rate_503"),
    "error_rate_504": ("faults", "error_rate_504"),
    "timeout_rate": ("faults", "timeout_rate"),
    "hang_s": ("faults", "hang_s"),
    "timeout_creates_thread": ("faults", "timeout_creates_thread"),
    "retry_after_s": ("faults", "retry_after_s"),
    "hostile": ("hostile", "mode"),
    "hostile_count": ("hostile", "count"),
    "hostile_retry_after_s": ("hostile", "retry_after_s"),
    "trickle_interval_s": ("hostile", "trickle_interval_s"),
    "body_bytes": ("hostile", "body_bytes"),
    "headers_delay_s": ("hostile", "headers_delay_s"),
    "tls_cert": (None, "tls_cert_file"),
    "tls_key": (None, "tls_key_file"),
}


def build_parser(prog: str = "python -m connector.simulator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve the Mindset Threads API simulator.")
    p.add_argument("--config", metavar="FILE", help="YAML file with SimulatorSettings fields")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 0)")
    app = p.add_argument_group("app (replaces the configured apps with this one)")
    app.add_argument("--app-uid", help=f"the appUid (default {DEFAULT_APP_UID})")
    app.add_argument("--api-key", help=f"its x-api-key (default {DEFAULT_API_KEY})")
    app.add_argument(
        "--agent", action="append", metavar="AGENT_UID", help="an agentUid (repeat; none = any)"
    )
    lat = p.add_argument_group("latency")
    lat.add_argument("--latency", choices=["fixed", "uniform", "exponential", "lognormal"])
    lat.add_argument("--latency-ms", type=float, help="fixed value, or the median")
    lat.add_argument("--latency-p99-ms", type=float, help="99th percentile (lognormal)")
    lat.add_argument("--latency-min-ms", type=float, help="lower bound (uniform) and floor")
    lat.add_argument("--latency-max-ms", type=float, help="upper bound (uniform) and cap")
    faults = p.add_argument_group("faults (probabilities per request)")
    for status in (502, 503, 504):
        faults.add_argument(f"--error-rate-{status}", type=float, metavar="P")
    faults.add_argument("--timeout-rate", type=float, metavar="P", help="hang without answer")
    faults.add_argument("--hang-s", type=float, help="how long a timeout hangs (default 300)")
    faults.add_argument(
        "--timeout-creates-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create the thread before hanging (default yes)",
    )
    faults.add_argument("--retry-after-s", type=int, help="Retry-After sent with injected 503")
    bad = p.add_argument_group("hostile API (see HostileSpec; also PUT /_simulator/faults)")
    bad.add_argument(
        "--hostile",
        choices=list(get_args(HostileMode)),
        help="misbehave this way (retry_after: 429 with a huge Retry-After; ...)",
    )
    bad.add_argument("--hostile-count", type=int, metavar="N", help="for the first N requests")
    bad.add_argument("--hostile-retry-after-s", type=int, help="Retry-After (default 999999)")
    bad.add_argument("--trickle-interval-s", type=float, help="seconds between body bytes")
    bad.add_argument("--body-bytes", type=int, help="size of the huge 201 body")
    bad.add_argument("--headers-delay-s", type=float, help="silence before slow headers")
    tls = p.add_argument_group("TLS (serve https)")
    tls.add_argument("--tls-cert", metavar="PEM", help="certificate chain")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    tls.add_argument(
        "--tls-self-signed",
        metavar="DIR",
        help="make a private CA and a certificate into DIR (ca.pem: the connector's api.ca_file)",
    )
    limit = p.add_argument_group("rate limit (429)")
    limit.add_argument("--rate-limit-per-s", type=float, help="token bucket rate")
    limit.add_argument("--rate-limit-burst", type=int, help="bucket size")
    p.add_argument("--seed", type=int, help="seed for reproducible latency and faults")
    p.add_argument("--access-log", action="store_true", default=None, help="log each request")
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    return p


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """The config file (if any) with the flags on top."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for dest, (section, field) in _OVERRIDES.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if section is None:
            data[field] = value
        else:
            data[section] = {**data.get(section, {}), field: value}
    if args.app_uid is not None or args.api_key is not None or args.agent is not None:
        data["apps"] = {
            args.app_uid or DEFAULT_APP_UID: {
                "api_key": args.api_key or DEFAULT_API_KEY,
                "agents": args.agent or [],
            }
        }
    if args.tls_self_signed is not None:
        files = make_private_ca(Path(args.tls_self_signed))
        data["tls_cert_file"], data["tls_key_file"] = files.cert_file, files.key_file
        log.info("serving https; the CA to trust is %s", files.ca_file)
    return SimulatorSettings.model_validate(data)


async def serve(settings: SimulatorSettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with ThreadsApiSimulator(settings) as simulator:
            apps = ", ".join(settings.apps)
            log.info("serving apps %s; admin endpoints at %s/_simulator/", apps, simulator.base_url)
            await stop.wait()
            log.info("signal received, stopping")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None, prog: str = "python -m connector.simulator") -> int:
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        settings = settings_from_args(args)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.error("invalid simulator settings: %s", exc)
        return 2
    # the imported modules live as long as the server: kept out of the collector's sight,
    # full collections stop pausing request handling for tens of ms (latency stays honest)
    gc.freeze()
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    return 0
