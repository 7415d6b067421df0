"""Arguments of ``connector dlq inspect`` and ``connector dlq redrive``.

Both read the connector's own config file (topics, group, Kafka security); neither calls
the Threads API, so neither needs the API key.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import orjson

from connector.config import ENV_PREFIX, ConnectorSettings, load_settings
from connector.dlq.inspect import inspect, summary_json, summary_text
from connector.dlq.plan import DEFAULT_MAX_REDRIVES, RedriveOptions
from connector.dlq.progress import Progress
from connector.dlq.reader import DlqError
from connector.dlq.records import NOT_REDRIVABLE_BY_DEFAULT, Filter, parse_when
from connector.dlq.redrive import redrive
from connector.errors import ConfigError, Stage
from connector.metrics import DEAD_LETTER_REASONS

EXIT_CONFIG = 2
EXIT_KAFKA = 1
API_KEY_ENV = f"{ENV_PREFIX}API__API_KEY"
STAGES = tuple(stage.value for stage in Stage)
KNOWN_CODES = frozenset(
    {code for codes in DEAD_LETTER_REASONS.values() for code in codes} | NOT_REDRIVABLE_BY_DEFAULT
)
HTTP_CODE = re.compile(r"http_[1-5][0-9][0-9]")  # the API's refusals: http_<status>


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="inspect and redrive the dead-letter topic")
    cmds = dlq.add_subparsers(dest="dlq_command", required=True)
    ins = cmds.add_parser(
        "inspect", help="dead letters by stage, code and day; --show N for the records"
    )
    _common(ins)
    ins.add_argument("--show", type=int, default=0, metavar="N", help="the N most recent records")
    ins.add_argument(
        "--max-bytes", type=int, default=300, help="show at most this much of each value"
    )
    red = cmds.add_parser(
        "redrive", help="copy dead letters back to their input topic (transactional, once)"
    )
    _common(red)
    red.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; send nothing"
    )
    red.add_argument(
        "--again", action="store_true", help="re-read from the start, copying earlier copies too"
    )
    red.add_argument("--rate", type=_rate, default=None, metavar="N/s", help="copies a second")
    red.add_argument("--batch", type=int, default=500, help="copies per transaction (at most)")
    red.set_defaults(max_redrives=DEFAULT_MAX_REDRIVES)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("config/connector.yaml"))
    p.add_argument("--code", action="append", default=[], help="dlq-code (repeat, or a,b)")
    p.add_argument("--stage", action="append", default=[], help="parse, validate, route, api")
    p.add_argument("--event-type", action="append", default=[], help="the event's type")
    p.add_argument("--source-topic", action="append", default=[], help="the input topic")
    p.add_argument("--since", type=_when, help="failed at or after: 2026-11-27, ...T08:00Z, 6h")
    p.add_argument("--until", type=_when, help="failed before (same forms)")
    p.add_argument(
        "--max-redrives",
        type=_positive,
        metavar="N",
        help="leave dead letters redriven N times already (redrive: "
        f"{DEFAULT_MAX_REDRIVES} unless given)",
    )
    p.add_argument("--json", action="store_true", help="JSON output for scripts")


def _rate(text: str) -> float:
    try:
        rate = float(text.strip().removesuffix("/s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 50/s)") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("the rate must be above 0")
    return rate


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _when(text: str) -> int:
    try:
        return parse_when(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (2026-11-27, 2026-11-27T08:00:00Z, 6h, 2d)"
        ) from None


def _set(values: list[str]) -> frozenset[str]:
    return frozenset(v.strip() for value in values for v in value.split(",") if v.strip())


def build_filter(args: argparse.Namespace) -> Filter:
    """The filter; ConfigError naming a --code or --stage no dead letter can have (a typo
    matched nothing and looked like an empty topic)."""
    problems = [
        f"--stage {stage}: not a stage; the stages are {', '.join(STAGES)}"
        + _did_you_mean(stage, STAGES)
        for stage in sorted(_set(args.stage) - set(STAGES))
    ] + [
        f"--code {code}: no dead letter has this code; the codes are "
        f"{', '.join(sorted(KNOWN_CODES))} and http_<status>" + _did_you_mean(code, KNOWN_CODES)
        for code in sorted(_set(args.code))
        if code not in KNOWN_CODES and not HTTP_CODE.fullmatch(code)
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return Filter(
        codes=_set(args.code),
        stages=_set(args.stage),
        event_types=_set(args.event_type),
        source_topics=_set(args.source_topic),
        since_ms=args.since,
        until_ms=args.until,
        max_redrives=args.max_redrives,
    )


def _did_you_mean(value: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def load_for_tools(path: Path) -> ConnectorSettings:
    """The config, with a placeholder API key when none is set: these commands make no
    API call, and an operator's shell rarely holds the key."""
    if API_KEY_ENV in os.environ:
        return load_settings(path)
    os.environ[API_KEY_ENV] = "unused-by-dlq-commands"
    try:
        return load_settings(path)
    finally:
        del os.environ[API_KEY_ENV]  # the settings are built and frozen: nothing reads it later


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_for_tools(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"connector: {exc}\n")
        return EXIT_CONFIG
    try:
        flt = build_filter(args)
    except ConfigError as exc:
        sys.stderr.write(f"connector dlq: {exc}\n")
        return EXIT_CONFIG
    try:
        if args.dlq_command == "inspect":
            summary = asyncio.run(inspect(settings, flt, max(0, args.show)))
            if args.json:
                out = orjson.dumps(summary_json(summary, flt, args.max_bytes)).decode() + "\n"
            else:
                out = summary_text(summary, args.max_bytes)
        else:
            opts = RedriveOptions(flt, args.dry_run, args.again, args.rate, max(1, args.batch))
            # a bar on a terminal only: scripts and --json get the summary alone
            progress = Progress(enabled=sys.stderr.isatty() and not args.json)
            report = asyncio.run(redrive(settings, opts, progress))
            out = orjson.dumps(report.to_json()).decode() + "\n" if args.json else report.to_text()
    except DlqError as exc:
        sys.stderr.write(f"connector dlq: {exc}\n")
        return EXIT_KAFKA
    sys.stdout.write(out)
    return 0
