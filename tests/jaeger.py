"""A real Jaeger (v2 engine, in-memory storage) on loopback ports of its own, for the
tracing tests: OTLP in, the query API out.

The binary is built from source once per machine by scripts/install-jaeger.sh (``make
tools`` runs it) into the user's cache; without it the tests fail saying so (they never
skip).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector.localkafka.ports import free_ports

JAEGER_VERSION = "v1.75.0"  # scripts/install-jaeger.sh's
CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}
  telemetry: {metrics: {level: none}, logs: {level: warn}}
extensions:
  jaeger_storage: {backends: {mem: {memory: {max_traces: 10000}}}}
  jaeger_query:
    storage: {traces: mem}
    http: {endpoint: "127.0.0.1:${env:JAEGER_QUERY_PORT}"}
    grpc: {endpoint: "127.0.0.1:${env:JAEGER_QUERY_GRPC_PORT}"}
  healthcheckv2: {use_v2: true, http: {endpoint: "127.0.0.1:${env:JAEGER_HEALTH_PORT}"}}
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "127.0.0.1:${env:OTLP_GRPC_PORT}"}
      http: {endpoint: "127.0.0.1:${env:OTLP_HTTP_PORT}"}
processors:
  batch: {timeout: 100ms}
exporters:
  jaeger_storage_exporter: {trace_storage: mem}
"""


def jaeger_binary() -> Path:
    cache = os.environ.get("THREADS_CONNECTOR_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "threads-connector"
    )
    binary = Path(cache) / f"jaeger-{JAEGER_VERSION}" / "jaeger"
    if not binary.is_file():
        pytest.fail(
            f"Jaeger is not built ({binary}): run scripts/install-jaeger.sh "
            "(make tools does; about 7 minutes cold)"
        )
    return binary


@dataclass(frozen=True)
class Jaeger:
    otlp_http: str  # the OTLP/HTTP traces endpoint (…/v1/traces)
    query: str  # the query API's base URL

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """The trace's spans as the query API gives them (empty: not found yet)."""
        response = httpx.get(f"{self.query}/api/traces/{trace_id}", timeout=5)
        if response.status_code == 404:
            return []
        response.raise_for_status()
        data = response.json()["data"]
        return list(data[0]["spans"]) if data else []

    def wait_for(self, trace_id: str, operations: set[str], timeout_s: float = 20) -> list[Any]:
        """Poll until the trace holds spans of every operation named (the collector
        batches: spans arrive within a few hundred ms of their export)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            if operations <= {s["operationName"] for s in spans}:
                return spans
            if time.monotonic() > deadline:
                found = sorted(s["operationName"] for s in spans)
                raise TimeoutError(f"trace {trace_id}: {found}, wanted {sorted(operations)}")
            time.sleep(0.2)


@contextlib.contextmanager
def running_jaeger(tmp_path: Path) -> Iterator[Jaeger]:
    binary = jaeger_binary()
    query, query_grpc, health, otlp_grpc, otlp_http = free_ports(5)
    config = tmp_path / "jaeger.yaml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "JAEGER_QUERY_PORT": str(query),
        "JAEGER_QUERY_GRPC_PORT": str(query_grpc),
        "JAEGER_HEALTH_PORT": str(health),
        "OTLP_GRPC_PORT": str(otlp_grpc),
        "OTLP_HTTP_PORT": str(otlp_http),
    }
    log = (tmp_path / "jaeger.log").open("wb")
    process = subprocess.Popen(
        [str(binary), "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{health}/status", timeout=1).status_code == 200:
                    break
            assert process.poll() is None, (tmp_path / "jaeger.log").read_text()
            assert time.monotonic() < deadline, "jaeger did not become healthy in 30 s"
            time.sleep(0.1)
        yield Jaeger(f"http://127.0.0.1:{otlp_http}/v1/traces", f"http://127.0.0.1:{query}")
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # seen once under heavy load, with many traces
            process.kill()
            process.wait(15)
        log.close()
