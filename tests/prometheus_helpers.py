"""A real Prometheus server (Debian's ``prometheus`` package) and ``promtool`` for tests.

``scripts/install-prometheus.sh`` (``make tools``) installs both. A test that needs them
fails, with that hint, when they are missing: the observability checks never skip silently.

Also: the dashboard's targets, and Grafana's template variables replaced by what a query
needs to run outside Grafana.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from connector.localkafka.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "threads-connector"
DASHBOARD = CHART / "dashboards" / "threads-connector.json"
ALERTS = CHART / "rules" / "alerts.yaml"
INSTALL_HINT = "install it with scripts/install-prometheus.sh (or `make tools`)"

# Grafana's built-in variables, as a test substitutes them.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "15000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; fails the test if it is not installed."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None
    )
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL_HINT}")
    return found


@dataclass
class ToolResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def promtool(
    *args: str, stdin: bytes | None = None, timeout_s: float = 120, cwd: Path | None = None
) -> ToolResult:
    """Run ``promtool`` without blocking the event loop (a connector may be running in it)."""
    proc = await asyncio.create_subprocess_exec(
        binary("promtool"),
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return ToolResult(proc.returncode or 0, out.decode(), err.decode())


class Prometheus:
    """A Prometheus server on a free loopback port, scraping ``targets`` every second,
    with its storage and config under ``workdir``; stopped when the block ends."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        job: str = "threads-connector",
        target_labels: dict[str, str] | None = None,
        rule_files: list[Path] | None = None,
        interval: str = "1s",
    ) -> None:
        self.workdir = workdir
        self.config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p.resolve()) for p in rule_files or []],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": targets, "labels": target_labels or {}}],
                }
            ],
        }
        self.base_url = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._http: httpx.AsyncClient | None = None
        self.log_path = workdir / "prometheus.log"

    async def __aenter__(self) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._http = httpx.AsyncClient(timeout=30)
        last_error = ""
        for _ in range(3):  # a free port can be taken between choosing and binding it
            port = free_ports(1)[0]
            self.base_url = f"http://127.0.0.1:{port}"
            with self.log_path.open("ab") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if await self._wait_ready(90):
                return self
            last_error = self.log_tail()
            await self._stop()
        await self._http.aclose()
        raise RuntimeError(f"prometheus did not become ready:\n{last_error}")

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()
        if self._http is not None:
            await self._http.aclose()

    async def _wait_ready(self, timeout_s: float) -> bool:
        assert self._proc is not None and self._http is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get(f"{self.base_url}/-/ready")).status_code == 200:
                    return True
            await asyncio.sleep(0.25)
        return False

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            if proc is not None:
                await proc.wait()
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET ``/api/v1/<path>``; the JSON body whatever the status (errors included)."""
        assert self._http is not None
        response = await self._http.get(f"{self.base_url}/api/v1/{path}", params=params)
        body: dict[str, Any] = response.json()
        return body

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.api("query", query=expr)

    async def query_range(self, expr: str, start: float, end: float, step: str) -> dict[str, Any]:
        return await self.api("query_range", query=expr, start=start, end=end, step=step)

    async def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None (no result, or an error)."""
        body = await self.query(expr)
        result = body.get("data", {}).get("result", [])
        if body.get("status") != "success" or not result:
            return None
        return float(result[0]["value"][1])

    async def wait_for(self, expr: str, timeout_s: float = 120) -> float:
        """Until the instant query ``expr`` returns a value (use a comparison to filter)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.value(expr)
            if found is not None and not math.isnan(found):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus never answered {expr!r}\n{self.log_tail()}")
            await asyncio.sleep(0.5)


# -- the dashboard ------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def load_alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def label_variables(dashboard: dict[str, Any]) -> list[str]:
    return [v["name"] for v in dashboard["templating"]["list"] if v["type"] != "datasource"]


def substitute(expr: str, label_vars: list[str], builtins: dict[str, str] | None = None) -> str:
    """Replace Grafana variables: built-ins by durations, label variables by ``.*`` (every
    label variable must be used as ``=~"$var"``, which ``.*`` then matches, absent too)."""
    values = {**BUILTINS, **(builtins or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in values:
            return values[name]
        if name in label_vars:
            return ".*"
        raise AssertionError(f"unknown variable ${name} in {expr!r}")

    return _VARIABLE.sub(replace, expr)


def has_data(body: dict[str, Any]) -> bool:
    """A query result with at least one sample (instant) or one point (range)."""
    result = body.get("data", {}).get("result", [])
    if body.get("data", {}).get("resultType") == "scalar":
        return True
    return any(series.get("value") or series.get("values") for series in result)


def finite_values(body: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for series in body.get("data", {}).get("result", []):
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        out.extend(float(v) for _, v in points if not math.isnan(float(v)))
    return out
