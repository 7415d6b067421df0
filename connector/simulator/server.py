"""The aiohttp application and ``ThreadsApiSimulator``, which serves it on the current loop.

async with ThreadsApiSimulator(SimulatorSettings(seed=1)) as sim:
    httpx.post(f"{sim.base_url}/api/v1/appuid/demo-app/threads", ...)
    sim.store.count_by_event_id()
"""

from __future__ import annotations

import logging
import ssl
import warnings
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Handler

from connector.simulator import admin
from connector.simulator.api import CREATE_THREAD_PATH, create_thread
from connector.simulator.responses import json_response
from connector.simulator.settings import (
    BehaviorSpec,
    FaultSpec,
    HostileSpec,
    LatencySpec,
    SimulatorSettings,
)
from connector.simulator.state import STATE, SimulatorState
from connector.simulator.store import ThreadStore

log = logging.getLogger(__name__)

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown path 404, 405, 413, ...) as JSON error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {
            name: value
            for name, value in exc.headers.items()
            if name.lower() not in ("content-type", "content-length")
        }
        return json_response(
            {"error": exc.reason, "detail": None}, status=exc.status, headers=headers
        )


def build_app(state: SimulatorState) -> web.Application:
    """The simulator's routes: the createThread operation and the admin endpoints."""
    app = web.Application(middlewares=[json_errors])
    app[STATE] = state
    app.router.add_post(CREATE_THREAD_PATH, create_thread, name="createThread")
    admin.add_routes(app)
    return app


def _url(address: object, scheme: str = "http") -> str:
    if not isinstance(address, tuple) or len(address) < 2:
        raise RuntimeError(f"the simulator is not listening on TCP: {address!r}")
    host, port = str(address[0]), int(address[1])
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class ThreadsApiSimulator:
    """The Threads API simulator, served on the running event loop.

    ``start()`` and ``stop()`` are idempotent; ``async with`` calls both.
    """

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings if settings is not None else SimulatorSettings()
        self._state = SimulatorState(self.settings)
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not running; call start() first")
        return self._base_url

    @property
    def store(self) -> ThreadStore:
        return self._state.store

    @property
    def behavior(self) -> BehaviorSpec:
        return self._state.behavior

    def set_behavior(self, behavior: BehaviorSpec) -> None:
        """Replace latency, faults and rate limit at once."""
        self._state.set_behavior(behavior)

    def set_faults(self, faults: FaultSpec) -> None:
        self.set_behavior(self.behavior.model_copy(update={"faults": faults}))

    def set_latency(self, latency: LatencySpec) -> None:
        self.set_behavior(self.behavior.model_copy(update={"latency": latency}))

    def set_rate_limit(self, per_s: float | None, burst: int | None = None) -> None:
        """``per_s=None`` turns the limit off."""
        self.set_behavior(
            BehaviorSpec(
                latency=self.behavior.latency,
                faults=self.behavior.faults,
                rate_limit_per_s=per_s,
                rate_limit_burst=burst,
                hostile=self.behavior.hostile,
            )
        )

    def set_hostile(self, hostile: HostileSpec) -> None:
        """Misbehave (``HostileSpec.mode``) for the next ``hostile.count`` requests."""
        self.set_behavior(self.behavior.model_copy(update={"hostile": hostile}))

    def reset(self) -> None:
        """Forget created threads and counts, re-seed, refill the bucket."""
        self._state.reset()

    async def start(self) -> None:
        if self._runner is not None:
            return
        settings = self.settings
        runner = web.AppRunner(
            build_app(self._state),
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=settings.shutdown_timeout_s,
            access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        )
        await runner.setup()
        self._state.begin()
        tls = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        try:
            await web.TCPSite(runner, settings.host, settings.port, ssl_context=tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._base_url = _url(runner.addresses[0], "https" if tls else "http")
        log.info("Threads API simulator listening on %s", self._base_url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._state.end()
        await runner.cleanup()
        log.info("Threads API simulator on %s stopped", self._base_url)
        self._base_url = None

    async def __aenter__(self) -> ThreadsApiSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if getattr(self, "_runner", None) is not None:
            warnings.warn(
                f"unclosed {self!r}: call stop()", ResourceWarning, stacklevel=2, source=self
            )

    def __repr__(self) -> str:
        return f"<ThreadsApiSimulator {self._base_url or 'stopped'}>"
