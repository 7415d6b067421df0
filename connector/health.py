"""``/metrics``, ``/healthz`` and ``/readyz`` on one port, served by aiohttp."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """The operational endpoints; ``port=0`` picks a free port (see ``port`` after start)."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, live: Check, ready: Check
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._live = live
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._check(self._live))
        app.router.add_get("/readyz", self._check(self._ready))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
            break

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    def _check(check: Check) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_request: web.Request) -> web.Response:
            ok, detail = check()
            return web.json_response(
                {"ok": ok, "detail": detail, "ts": time.time()}, status=200 if ok else 503
            )

        return handler
