"""A simulator of the Mindset Threads API (``POST /api/v1/appuid/{appUid}/threads``).

It follows the shipped OpenAPI document (``threads-api-openapi.yaml``): auth, validation and
status codes, plus configurable latency, injected 502/503/504 and timeouts, a 429 rate
limit, and a record of the threads it created. See ``server``, ``admin`` and ``cli``.
"""

from connector.simulator.cli import main
from connector.simulator.faults import Fault, FaultModel, LatencySampler
from connector.simulator.ratelimit import TokenBucket
from connector.simulator.server import ThreadsApiSimulator, build_app
from connector.simulator.settings import (
    AppSpec,
    BehaviorSpec,
    FaultSpec,
    HostileSpec,
    LatencySpec,
    SimulatorSettings,
)
from connector.simulator.store import CreatedThread, ThreadStore
from connector.simulator.threaded import SimulatorThread, run_in_thread
from connector.simulator.tls import TlsFiles, make_private_ca
from connector.simulator.validation import resolve_human_uid

__all__ = [
    "AppSpec",
    "BehaviorSpec",
    "CreatedThread",
    "Fault",
    "FaultModel",
    "FaultSpec",
    "HostileSpec",
    "LatencySampler",
    "LatencySpec",
    "SimulatorSettings",
    "SimulatorThread",
    "ThreadStore",
    "ThreadsApiSimulator",
    "TlsFiles",
    "TokenBucket",
    "build_app",
    "main",
    "make_private_ca",
    "resolve_human_uid",
    "run_in_thread",
]
