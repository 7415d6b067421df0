"""Observability: metrics, the Grafana dashboard, the alerts, JSON logs, and secrets.

- Unit checks: the dashboard is a Grafana JSON model whose queries name only exported
  metrics and cover all of them; ``promtool check rules`` and ``promtool test rules`` on the
  alerts; ``promtool check metrics`` on a registry with every metric in use.
- On a real broker with the Threads API simulator: a real Prometheus (Debian's package)
  scrapes a connector that produces results, dead letters, retries and dedup hits; every
  dashboard query and every alert expression is evaluated through Prometheus' HTTP API.
- Secrets: the API key (a wrong one, then the right one) and the system message text appear
  in no log line, metric, result, dedup changelog record or dead-letter header.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from connector import __version__
from connector.dedup import changelog_topic
from connector.logs import JsonFormatter, TextFormatter, configure_logging
from connector.metrics import DEAD_LETTER_REASONS, Metrics
from connector.simulator import (
    AppSpec,
    FaultSpec,
    LatencySpec,
    SimulatorSettings,
    ThreadsApiSimulator,
)
from connector.simulator.settings import DEFAULT_AGENTS
from tests.harness import (
    ROUTES,
    Names,
    event,
    make_settings,
    produce,
    read_all,
    running,
    wait_until_committed,
)
from tests.prometheus_helpers import (
    ALERTS,
    Prometheus,
    all_panels,
    finite_values,
    has_data,
    label_variables,
    load_alerts,
    load_dashboard,
    promtool,
    substitute,
)

ROOT = Path(__file__).resolve().parent.parent
METRIC_NAME = re.compile(r"\b(?:threads_connector|process)_[a-z0-9_]+")


def exported_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can export (``_total``, ``_bucket``, … included)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        else:
            names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in all_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


# -- the dashboard, statically --------------------------------------------------------------


# the dashboard variables that filter by a label only some series carry, and those series
SERIES_LABEL_VARIABLES = {
    "app": {
        f"threads_connector_{name}"
        for name in (
            "api_responses_total", "api_call_duration_seconds_bucket", "calls_in_flight",
            "auth_paused", "rate_limit_share_per_second", "rate_limit_per_second",
            "rate_limit_tokens", "rate_limited_total", "api_key_invalid", "api_paused_seconds",
            "dead_letters_total", "threads_created_total",
        )
    },
    "topic": {
        f"threads_connector_{name}"
        for name in (
            "events_consumed_total", "consumer_lag", "dedup_hits_total", "dead_letters_total",
            "threads_created_total",
        )
    },
}  # fmt: skip


def test_dashboard_is_a_grafana_json_model() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "threads-connector"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard.get("id") is None  # provisioned dashboards carry no database id
    templating = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = templating["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    label_vars = label_variables(dashboard)
    assert label_vars, "a namespace/job variable is expected"
    for name in label_vars:
        variable = templating[name]
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["includeAll"] and variable["allValue"] == ".*", name

    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            expr = target["expr"]
            for name in label_vars:  # label variables only as regex matchers
                uses = re.findall(rf'(\S\S)"\$\{{?{name}\b', expr)
                assert all(u == "=~" for u in uses), (panel["title"], name, expr)
                # where the series come from: in every query; app and topic where they exist
                assert uses or name in SERIES_LABEL_VARIABLES, (panel["title"], name, expr)
            for name, metrics in SERIES_LABEL_VARIABLES.items():
                for metric in re.findall(r"(threads_connector_\w+)\{", expr):
                    if metric in metrics:
                        assert f'{name}=~"${name}"' in expr, (panel["title"], name, expr)


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    titles = " | ".join(p["title"].lower() for p in all_panels(load_dashboard()["panels"]))
    for words in [
        "throughput",
        "consumer lag",
        "responses by code",
        "call latency",
        "attempts",
        "dead letters by stage",
        "why are events not moving",
        "dead letters by app and topic",
        "calls in flight",
        "rate limit: current vs share",
        "rate-limit wait",
        "rate-limited (429/503)",
        "partitions assigned and paused",
        "end-to-end latency",
        "commit cycle duration",
        "commit failures, fencing, oversize outcomes",
        "dedup hits",
        "dedup store",
        "dedup evictions and restores",
        "rebalances",
        "auth paused",
        "ready",
    ]:
        assert words in titles, words


def test_queries_name_only_exported_metrics_and_cover_them_all() -> None:
    exported = exported_names(Metrics())
    used_dashboard = {n for e in dashboard_exprs() for n in METRIC_NAME.findall(e)}
    used_alerts = {n for r in load_alerts() for n in METRIC_NAME.findall(r["expr"])}
    assert not (used_dashboard | used_alerts) - exported, "queries name unknown metrics"
    # every metric family the connector exports is on the dashboard
    # the interpreter's own series (python_gc_*, python_info) are not the operator's concern
    families = {f.name for f in Metrics().registry.collect() if not f.name.startswith("python_")}
    shown = {
        family
        for family in families
        if any(n == family or n.startswith(f"{family}_") for n in used_dashboard)
    }
    assert families - shown == set(), "metrics missing from the dashboard"


def test_every_dead_letter_code_is_initialised() -> None:
    """``Metrics`` creates each known (stage, reason) at 0 so ``increase()`` sees the first
    dead letter: the list must name every code the connector raises."""
    known = {code for codes in DEAD_LETTER_REASONS.values() for code in codes}
    raised: set[str] = set()
    for path in (ROOT / "connector").glob("*.py"):
        raised |= set(re.findall(r'\bcode="([a-z_0-9]+)"', path.read_text()))
    assert raised, "no EventRejected codes found: has the code moved?"
    assert raised <= known, f"add to DEAD_LETTER_REASONS: {sorted(raised - known)}"


def test_known_series_start_at_zero() -> None:
    """Series born at 1 are invisible to increase(): the known ones exist from the start."""
    m = Metrics()
    value = m.registry.get_sample_value
    m.init_apps(["app-a", "app-b"])
    for app in ("app-a", "app-b"):
        labels = {"status_class": "4xx", "code": "403", "app": app}
        assert value("threads_connector_api_responses_total", labels) == 0
        assert value("threads_connector_auth_paused", {"app": app}) == 0
        assert value("threads_connector_rate_limited_total", {"app": app}) == 0
        assert value("threads_connector_calls_in_flight", {"app": app}) == 0
    assert value("threads_connector_commit_failures_total", {"mode": "transaction"}) == 0
    assert value("threads_connector_rebalances_total", {"kind": "assign"}) == 0
    labels = {"status_class": "2xx", "app": "app-b"}
    assert value("threads_connector_api_call_duration_seconds_count", labels) == 0
    assert value("threads_connector_build_info", {"version": __version__}) == 1
    # the process' own series (CPU, memory, open files): a registry of our own lacked them
    assert (value("process_cpu_seconds_total") or 0) > 0
    assert (value("process_resident_memory_bytes") or 0) > 0
    assert b"python_info{" in generate_latest(m.registry)
    m.init_topics(["orders"])
    assert value("threads_connector_events_consumed_total", {"topic": "orders"}) == 0
    labels = {"topic": "orders", "app": "app-b"}
    assert value("threads_connector_threads_created_total", labels) == 0
    assert (
        value("threads_connector_dedup_hits_total", {"topic": "orders", "kind": "in_flight"}) == 0
    )
    # dead letters by app and topic: the API's with their app, the others before a route
    labels = {"stage": "api", "reason": "http_404", "app": "app-a", "topic": "orders"}
    assert value("threads_connector_dead_letters_total", labels) == 0
    labels = {"stage": "parse", "reason": "invalid_json", "app": "", "topic": "orders"}
    assert value("threads_connector_dead_letters_total", labels) == 0


# -- promtool ------------------------------------------------------------------------------


async def test_promtool_check_rules() -> None:
    result = await promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.output
    assert "SUCCESS" in result.stdout, result.output
    assert "WARNING" not in (result.stdout + result.stderr).upper(), result.output


async def test_promtool_check_metrics_with_every_metric_in_use() -> None:
    m = Metrics()
    m.events_consumed.labels("in").inc()
    m.dedup_hits.labels("in", "window").inc()
    m.threads_created.labels("in", "app-a").inc()
    m.results_published.inc()
    m.api_responses.labels("2xx", "201", "app-a").inc()
    m.api_call_duration.labels("2xx", "app-a").observe(3.2)
    m.event_attempts.observe(2)
    m.api_retries.labels("503").inc()
    m.dead_letters.labels("parse", "invalid_json", "", "in").inc()
    m.consumer_lag.labels("in", "0").set(12)
    m.end_to_end_latency.observe(4.0)
    m.commit_duration.labels("transaction").observe(0.05)
    m.rate_limit_wait.inc(0.5)
    body = generate_latest(m.registry)
    result = await promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, result.output
    assert not result.stdout.strip() and not result.stderr.strip(), result.output
    # units in names, _total counters, no unbounded label
    text = body.decode()
    assert "threads_connector_api_call_duration_seconds_bucket" in text
    assert 'le="60.0"' in text and 'le="0.1"' in text  # calls of 0.1-60 s fit the buckets
    for family in m.registry.collect():
        for sample in family.samples:
            assert not {"event_id", "user", "user_id", "thread_uid"} & set(sample.labels)


def _render(template: str, labels: dict[str, str], value: str) -> str:
    """The annotation as Prometheus expands it, for the few template forms the rules use."""

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1).strip()
        if inner.startswith("$labels."):
            return labels.get(inner.removeprefix("$labels."), "")
        if inner.startswith("$value"):
            return value
        raise AssertionError(f"template form not handled by the test: {inner}")

    return re.sub(r"\{\{(.*?)\}\}", replace, template)


async def test_promtool_unit_tests_for_alerts(tmp_path: Path) -> None:
    """Auth failure, dead letters, no progress and transaction failures fire when they
    should, and not otherwise (``promtool test rules``)."""
    rules = {r["alert"]: r for r in load_alerts()}
    base = {"namespace": "prod", "job": "tc"}
    sel = 'namespace="prod", job="tc", instance="10.0.0.1:9000"'

    def expect(alert: str, extra: dict[str, str], value: str) -> dict[str, Any]:
        labels = {**base, **extra}
        rule = rules[alert]
        return {
            "exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": {
                k: _render(v, labels, value) for k, v in rule["annotations"].items()
            },
        }

    tests = [
        {  # the auth gate closes at minute 2
            "interval": "1m",
            "input_series": [
                {
                    "series": f'threads_connector_auth_paused{{{sel}, app="app-a"}}',
                    "values": "0 0 1x10",
                },
                {  # another app of the replica goes on: the alert names the one paused
                    "series": f'threads_connector_auth_paused{{{sel}, app="app-b"}}',
                    "values": "0x12",
                },
                {"series": f"threads_connector_ready{{{sel}}}", "values": "1 1 0x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "ThreadsConnectorAuthFailure", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "ThreadsConnectorAuthFailure",
                    "exp_alerts": [expect("ThreadsConnectorAuthFailure", {"app": "app-a"}, "1")],
                },
                # not ready because of the auth pause: only the auth alert, not this one
                {"eval_time": "12m", "alertname": "ThreadsConnectorNotReady", "exp_alerts": []},
            ],
        },
        {  # the schema registry is down from minute 2 to minute 6
            "interval": "1m",
            "input_series": [
                {
                    "series": f"threads_connector_schema_registry_up{{{sel}}}",
                    "values": "1 1 0 0 0 0 1 1 1",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "3m",
                    "alertname": "ThreadsConnectorSchemaRegistryDown",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "5m",
                    "alertname": "ThreadsConnectorSchemaRegistryDown",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorSchemaRegistryDown",
                            {"instance": "10.0.0.1:9000"},
                            "0",
                        )
                    ],
                },
                {
                    "eval_time": "8m",
                    "alertname": "ThreadsConnectorSchemaRegistryDown",
                    "exp_alerts": [],
                },
            ],
        },
        {  # a route paused by a run of 404s at minute 2 (a wrong api.base_url): its own
            # alert names app, route and status; the replica's NotReady stays quiet
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_route_paused_status"
                    f'{{{sel}, app="app-a", route="*/order.shipped"}}',
                    "values": "0 0 404x10",
                },
                {  # one that paused and resumed within the minute: quiet
                    "series": "threads_connector_route_paused_status"
                    f'{{{sel}, app="app-b", route="*/order.shipped"}}',
                    "values": "0 0 422 0x9",
                },
                {"series": f"threads_connector_ready{{{sel}}}", "values": "1 1 0x10"},
                {"series": f"threads_connector_api_stopped{{{sel}}}", "values": "0x12"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "ThreadsConnectorRoutePaused", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "ThreadsConnectorRoutePaused",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorRoutePaused",
                            {"app": "app-a", "route": "*/order.shipped"},
                            "404",
                        )
                    ],
                },
                {"eval_time": "12m", "alertname": "ThreadsConnectorNotReady", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "ThreadsConnectorApiStopped", "exp_alerts": []},
            ],
        },
        {  # api.on_error=stop stopped the calls: at once
            "interval": "1m",
            "input_series": [
                {"series": f"threads_connector_api_stopped{{{sel}}}", "values": "0 0 1x5"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "ThreadsConnectorApiStopped", "exp_alerts": []},
                {
                    "eval_time": "2m",
                    "alertname": "ThreadsConnectorApiStopped",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorApiStopped", {"instance": "10.0.0.1:9000"}, "1"
                        )
                    ],
                },
            ],
        },
        {  # 401s counted (the gauge may be missing, e.g. an older replica)
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_api_responses_total"
                    f'{{{sel}, status_class="4xx", code="401", app="app-b"}}',
                    "values": "0 0 3 6 9 12 15",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "5m",
                    "alertname": "ThreadsConnectorAuthFailure",
                    "exp_alerts": [expect("ThreadsConnectorAuthFailure", {"app": "app-b"}, "1")],
                },
            ],
        },
        {  # the first dead letter of a kind (its series exists at 0: Metrics initialises it)
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_dead_letters_total"
                    f'{{{sel}, stage="parse", reason="invalid_json"}}',
                    "values": "0 0 0 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2",
                },
                {
                    "series": "threads_connector_dead_letters_total"
                    f'{{{sel}, stage="route", reason="no_route"}}',
                    "values": "0x17",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "ThreadsConnectorDeadLetters", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "ThreadsConnectorDeadLetters",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorDeadLetters",
                            {"stage": "parse", "reason": "invalid_json"},
                            "2",
                        )
                    ],
                },
                # ten minutes later the window has moved past it
                {"eval_time": "16m", "alertname": "ThreadsConnectorDeadLetters", "exp_alerts": []},
            ],
        },
        {  # lag but no commit cycle: no progress; the healthy job next to it is quiet
            "interval": "1m",
            "input_series": [
                {
                    "series": f'threads_connector_consumer_lag{{{sel}, topic="in", partition="0"}}',
                    "values": "500x30",
                },
                {
                    "series": "threads_connector_commit_duration_seconds_count"
                    f'{{{sel}, mode="transaction"}}',
                    "values": "10x30",
                },
                {
                    "series": "threads_connector_consumer_lag"
                    '{namespace="prod", job="ok", instance="b", topic="in", partition="0"}',
                    "values": "500x30",
                },
                {
                    "series": "threads_connector_commit_duration_seconds_count"
                    '{namespace="prod", job="ok", instance="b", mode="transaction"}',
                    "values": "0+60x30",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "ThreadsConnectorNoProgress",
                    "exp_alerts": [expect("ThreadsConnectorNoProgress", {}, "500")],
                },
            ],
        },
        {  # an aborted transaction
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_commit_failures_total"
                    f'{{{sel}, mode="transaction"}}',
                    "values": "0 0 1 1 1",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "3m",
                    "alertname": "ThreadsConnectorTransactionFailures",
                    "exp_alerts": [
                        expect("ThreadsConnectorTransactionFailures", {"mode": "transaction"}, "1")
                    ],
                },
            ],
        },
        {  # a backlog after an outage: half the events expired (max_event_age_s) for 40
            # minutes; that is the routes' policy at work: no dead-letter alert, an info one
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_dead_letters_total"
                    f'{{{sel}, stage="route", reason="expired"}}',
                    "values": "0 0 0 300+50x40",
                },
                {
                    "series": f'threads_connector_events_consumed_total{{{sel}, topic="in"}}',
                    "values": "0+100x43",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ThreadsConnectorDeadLetters", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "ThreadsConnectorDeadLetterRateHigh",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "5m",
                    "alertname": "ThreadsConnectorEventsExpired",
                    "exp_alerts": [expect("ThreadsConnectorEventsExpired", {}, "400")],
                },
            ],
        },
        {  # partitions that skip offsets, are stopped, or are blocked (issue 20)
            "interval": "1m",
            "input_series": [
                {
                    "series": "threads_connector_offsets_skipped_total"
                    f'{{{sel}, topic="in", partition="3"}}',
                    "values": "0x20 20x20",
                },
                {
                    "series": "threads_connector_partition_stopped"
                    f'{{{sel}, topic="in", partition="4"}}',
                    "values": "0 0 1x10",
                },
                {
                    "series": "threads_connector_partition_blocked_seconds"
                    f'{{{sel}, topic="in", partition="5"}}',
                    "values": "0 60 120 180 240",
                },
                {  # blocked for a minute now and then (an ordinary transaction): no alert
                    "series": "threads_connector_partition_blocked_seconds"
                    f'{{{sel}, topic="in", partition="6"}}',
                    "values": "0 60 0 60 0",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "19m",
                    "alertname": "ThreadsConnectorOffsetsSkipped",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "25m",
                    "alertname": "ThreadsConnectorOffsetsSkipped",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorOffsetsSkipped",
                            {"topic": "in", "partition": "3"},
                            "20",
                        )
                    ],
                },
                {
                    "eval_time": "1m",
                    "alertname": "ThreadsConnectorPartitionStopped",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "3m",
                    "alertname": "ThreadsConnectorPartitionStopped",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorPartitionStopped",
                            {"topic": "in", "partition": "4"},
                            "1",
                        )
                    ],
                },
                {
                    "eval_time": "2m",
                    "alertname": "ThreadsConnectorPartitionBlocked",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "3m",
                    "alertname": "ThreadsConnectorPartitionBlocked",
                    "exp_alerts": [
                        expect(
                            "ThreadsConnectorPartitionBlocked",
                            {"topic": "in", "partition": "5"},
                            "180",
                        )
                    ],
                },
            ],
        },
    ]
    unit = tmp_path / "alerts-test.yaml"
    unit.write_text(
        yaml.safe_dump(
            {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    result = await promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.output


# -- JSON logs --------------------------------------------------------------------------------


def test_json_formatter_one_object_a_line() -> None:
    record = logging.LogRecord("connector.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.event_id = "e-1"
    record.correlation_id = "c-1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (
        entry["msg"] == "a b" and entry["level"] == "WARNING" and entry["logger"] == "connector.x"
    )
    assert entry["event_id"] == "e-1" and entry["correlation_id"] == "c-1"
    assert entry["ts"].endswith("+00:00")


def test_text_formatter_keeps_an_event_id_with_line_breaks_on_one_line() -> None:
    """The event id is the producer's text: with a line break it forged a second log line
    ("... ERROR connector.app: ...") in the text format. Control characters are escaped."""
    record = logging.LogRecord("connector.x", logging.WARNING, __file__, 1, "dead %s", ("x",), None)
    record.event_id = "e-1\n2026-11-28 10:00:00,000 ERROR connector.app: forged\r\x1b[2J"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "event_id=e-1\\n2026-11-28" in line and "forged" in line


# -- integration: a real Prometheus scraping a connector ------------------------------------


@pytest.mark.integration
async def test_dashboard_and_alerts_on_a_real_prometheus(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh("obs")
    sim_settings = SimulatorSettings(
        seed=11,
        latency=LatencySpec(distribution="uniform", min_ms=5, max_ms=120),
        faults=FaultSpec(error_rate_503=0.15, error_rate_502=0.1),
    )
    dashboard = load_dashboard()
    label_vars = label_variables(dashboard)
    async with ThreadsApiSimulator(sim_settings) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            api={"max_attempts": 10, "backoff_initial_s": 0.02, "backoff_max_s": 0.2},
            # an agent the API does not know: its events are the API's dead letters (404)
            routes=[*ROUTES, {**ROUTES[0], "event_type": "order.lost", "agent_uid": "nobody"}],
        )
        async with running(settings) as connector:
            port = connector.health.port
            assert port, "the health server picked no port"
            async with Prometheus(
                tmp_path / "prometheus",
                [f"127.0.0.1:{port}"],
                target_labels={"namespace": "obs-test"},
                rule_files=[ALERTS],
            ) as prom:
                # Prometheus applies its scrape config a few seconds after it is ready, and a
                # counter must be seen before it moves for rate()/increase() to count it
                await prom.wait_for("count_over_time(threads_connector_ready[1m]) >= 3", 120)
                started = time.time()
                good = [
                    (f"u-{i % 5}".encode(), event(f"o-{i}", user=f"u-{i % 5}")) for i in range(40)
                ]
                bad = [(b"bad-1", b'{"id": "x", '), (b"bad-2", b"not json at all")]
                unrouted = [
                    (b"nr", orjson.dumps({"id": f"nr-{i}", "type": "invoice.paid"}))
                    for i in range(2)
                ]
                lost = [(b"lost", event(f"lost-{i}", type="order.lost")) for i in range(2)]
                await produce(kafka_bootstrap, names.input, good + bad + unrouted + lost)
                await wait_until_committed(kafka_bootstrap, names.group, names.input, 120)
                # copies of events already done: dedup hits (same keys, same partitions)
                await produce(kafka_bootstrap, names.input, good[:5])
                await wait_until_committed(kafka_bootstrap, names.group, names.input, 120)

                # Prometheus has scraped the outcome several times
                for expr in [
                    'up{job="threads-connector"} == 1',
                    "count_over_time(threads_connector_ready[1m]) >= 5",
                    "sum(threads_connector_threads_created_total) >= 40",
                    "sum(threads_connector_dead_letters_total) >= 6",
                    "sum(threads_connector_dedup_hits_total) >= 5",
                    "sum(threads_connector_api_retries_total) > 0",
                    "count(threads_connector_consumer_lag) >= 2",
                    "sum(threads_connector_end_to_end_latency_seconds_count) >= 40",
                ]:
                    await prom.wait_for(expr, timeout_s=120)
                await prom.wait_for("count_over_time(threads_connector_ready[1m]) >= 8", 120)

                # the connector's own /metrics body passes promtool's lint
                async with httpx.AsyncClient() as http:
                    body = (await http.get(f"http://127.0.0.1:{port}/metrics")).content
                lint = await promtool("check", "metrics", stdin=body)
                assert lint.returncode == 0, lint.output
                assert not lint.stdout.strip() and not lint.stderr.strip(), lint.output
                # dead letters by app (once a route chose one) and input topic
                scraped = {
                    (s.labels["stage"], s.labels["reason"], s.labels["app"], s.labels["topic"]): s
                    for f in text_string_to_metric_families(body.decode())
                    if f.name == "threads_connector_dead_letters"
                    for s in f.samples
                    if s.name.endswith("_total")
                }
                assert scraped[("api", "http_404", "demo-app", names.input)].value == 2
                assert scraped[("route", "no_route", "", names.input)].value == 2
                # bounded labels: no event id or user id became a label value
                ids = {f"o-{i}" for i in range(40)} | {f"u-{i}" for i in range(5)} | {"nr-0"}
                for family in text_string_to_metric_families(body.decode()):
                    for sample in family.samples:
                        assert not ids & set(sample.labels.values()), sample

                # dashboard variables resolve
                for variable in dashboard["templating"]["list"]:
                    if variable["type"] != "query":
                        continue
                    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
                    assert match, variable["definition"]
                    selector = substitute(match.group(1), label_vars)
                    answer = await prom.api(
                        f"label/{match.group(2)}/values", **{"match[]": selector}
                    )
                    assert answer["status"] == "success", (variable["name"], answer)
                    assert answer["data"], (variable["name"], selector)

                # every panel query: valid, and data to show
                end = time.time()
                problems: list[str] = []
                for panel in all_panels(dashboard["panels"]):
                    if panel["type"] == "row":
                        continue
                    values: list[float] = []
                    for target in panel["targets"]:
                        expr = substitute(target["expr"], label_vars)
                        if target.get("instant"):
                            answer = await prom.query(expr)
                        else:
                            answer = await prom.query_range(expr, started, end, "2s")
                        where = f"{panel['title']} [{target['refId']}] {expr}"
                        if answer.get("status") != "success":
                            problems.append(f"{where}: {answer.get('error')}")
                        elif not has_data(answer):
                            problems.append(f"{where}: no data")
                        values += finite_values(answer)
                    if not values:
                        problems.append(f"{panel['title']}: no finite value in any query")
                assert not problems, "\n".join(problems)

                # every alert expression is a valid query, and every rule evaluates cleanly
                alerts = load_alerts()
                for rule in alerts:
                    answer = await prom.query(rule["expr"])
                    assert answer["status"] == "success", (rule["alert"], answer)
                await _wait_rules_evaluated(prom, {r["alert"] for r in alerts})
                states = await _alert_states(prom)
                # dead letters happened: that alert fires; nothing refused the key
                assert states["ThreadsConnectorDeadLetters"] == "firing", states
                assert states["ThreadsConnectorAuthFailure"] == "inactive", states


async def _alert_states(prom: Prometheus) -> dict[str, str]:
    answer = await prom.api("rules", type="alert")
    return {
        rule["name"]: rule["state"] for group in answer["data"]["groups"] for rule in group["rules"]
    }


async def _wait_rules_evaluated(prom: Prometheus, expected: set[str]) -> None:
    """Until every alerting rule was evaluated without error (health ok) and the dead
    letters alert had a chance to fire."""
    deadline = time.monotonic() + 120
    while True:
        answer = await prom.api("rules", type="alert")
        rules = [r for g in answer["data"]["groups"] for r in g["rules"]]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for r in rules}
        assert set(health) == expected, health
        bad = {n: h for n, h in health.items() if h[0] == "err"}
        assert not bad, bad
        states = {r["name"]: r["state"] for r in rules}
        if all(h[0] == "ok" for h in health.values()) and (
            states["ThreadsConnectorDeadLetters"] == "firing"
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"rules not evaluated: {health} {states}\n{prom.log_tail()}")
        await asyncio.sleep(0.5)


# -- integration: secrets never leak ----------------------------------------------------------


def _record_bytes(record: Any) -> list[bytes]:
    parts = [record.key or b"", record.value or b""]
    for name, value in record.headers or ():
        parts += [name.encode(), value or b""]
    return parts


@pytest.mark.integration
async def test_api_key_and_system_message_never_leak(kafka_bootstrap: str, tmp_path: Path) -> None:
    key = f"sk-live-{uuid.uuid4().hex}"
    wrong_key = f"sk-wrong-{uuid.uuid4().hex}"
    phrase = f"Confidential-instructions-{uuid.uuid4().hex[:12]}"
    tail = f"never-tell-the-user-{uuid.uuid4().hex[:8]}"
    secrets = {"api key": key, "wrong api key": wrong_key, "system message": phrase, "tail": tail}
    key_file = tmp_path / "api-key"
    key_file.write_text(wrong_key)  # first a key the API refuses (401), then the right one

    names = Names.fresh("secret")
    template = f"{phrase}: order ${{data.orderId}} shipped for ${{user.id}}; {tail}"
    routes = [
        {**ROUTES[0], "message_template": template},
        {  # an agent the API does not know: 404, an api-stage dead letter
            **ROUTES[0],
            "event_type": "order.cancelled",
            "agent_uid": "agent-nobody",
            "message_template": template,
        },
    ]
    sim_settings = SimulatorSettings(
        seed=5,
        apps={"demo-app": AppSpec(api_key=SecretStr(key), agents=list(DEFAULT_AGENTS))},
        latency=LatencySpec(distribution="uniform", min_ms=5, max_ms=60),
        faults=FaultSpec(error_rate_503=0.15, timeout_rate=0.08, hang_s=1.0),
    )

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    saved_levels = {n: logging.getLogger(n).level for n in ("aiokafka", "httpx")}
    stream = io.StringIO()
    async with ThreadsApiSimulator(sim_settings) as sim:
        settings = make_settings(
            kafka_bootstrap,
            sim.base_url,
            names,
            partitions=2,
            routes=routes,
            api={
                "api_key": None,
                "api_key_file": key_file,
                "auth_probe_interval_s": 0.3,
                "secret_refresh_s": 0.2,
                "request_timeout_s": 0.5,
                "max_attempts": 10,
                "backoff_initial_s": 0.02,
                "backoff_max_s": 0.2,
            },
            logging={"level": "DEBUG", "format": "json"},
        )
        # the production set-up (connector.cli), its stderr handler writing to our buffer
        configure_logging(settings.logging.level, settings.logging.format)
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        try:
            async with running(settings) as connector:
                records = [
                    (f"u-{i % 4}".encode(), event(f"s-{i}", user=f"u-{i % 4}", order=f"A-{i}"))
                    for i in range(20)
                ]
                records += [
                    (b"u-9", event("c-1", user="u-9", type="order.cancelled")),
                    (b"bad", b'{"id": "x", "type": '),
                    (b"nr", orjson.dumps({"id": "nr-1", "type": "invoice.paid"})),
                    (b"mf", orjson.dumps({"id": "mf-1", "type": "order.shipped"})),
                ]
                await produce(kafka_bootstrap, names.input, records)
                deadline = time.monotonic() + 60
                while connector.metrics.auth_paused.labels("demo-app")._value.get() != 1:
                    assert time.monotonic() < deadline, "the wrong key never paused the calls"
                    await asyncio.sleep(0.1)
                key_file.write_text(key)  # the secret is rotated
                await wait_until_committed(kafka_bootstrap, names.group, names.input, 120)
                async with httpx.AsyncClient() as http:
                    metrics_body = (
                        await http.get(f"http://127.0.0.1:{connector.health.port}/metrics")
                    ).text
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
        sent = sim.store.all()

    # the phrase did reach the API (so its absence below means something)
    assert sent and all(phrase in t.message and tail in t.message for t in sent)
    results = await read_all(kafka_bootstrap, names.results)
    dead = await read_all(kafka_bootstrap, names.dead)
    changelog = await read_all(
        kafka_bootstrap,
        changelog_topic(names.group, names.input, settings.dedup.changelog_suffix),
    )
    assert len({orjson.loads(r.value)["eventId"] for r in results}) >= 15
    dlq_codes = {dict(d.headers).get("dlq-code") for d in dead}
    assert {b"http_404", b"invalid_json", b"no_route", b"missing_field"} <= dlq_codes, dlq_codes

    log_text = stream.getvalue()
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert lines, "no log line captured"
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e["level"] == "DEBUG" for e in entries), "log level from config (DEBUG)"
    created = [e for e in entries if e["msg"] == "thread created"]
    assert len(created) >= 15
    assert all(e.get("event_id") and e.get("correlation_id") for e in created)
    assert any("API key" in e["msg"] for e in entries), "the 401 pause was logged"
    dead_lines = [e for e in entries if e["msg"] == "event dead-lettered"]
    assert {e["code"] for e in dead_lines} >= {"http_404", "invalid_json", "no_route"}

    haystacks: dict[str, bytes] = {
        "logs": log_text.encode(),
        "/metrics": metrics_body.encode(),
    }
    for label, topic_records in [("results", results), ("dedup changelog", changelog)]:
        haystacks[label] = b"\n".join(p for r in topic_records for p in _record_bytes(r))
    # a dead letter keeps the input's key, value and headers untouched (and they hold no
    # secret here); everything the connector added is in its dlq-* headers
    haystacks["dead letters"] = b"\n".join(p for r in dead for p in _record_bytes(r))
    for what, secret in secrets.items():
        for where, data in haystacks.items():
            assert secret.encode() not in data, f"the {what} leaked into {where}"
    # sanity: the haystacks are the real thing
    assert b"threads_connector_threads_created_total" in haystacks["/metrics"]
    assert haystacks["results"] and haystacks["dedup changelog"] and haystacks["dead letters"]
