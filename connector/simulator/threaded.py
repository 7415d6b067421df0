"""``run_in_thread``: the simulator on its own event loop in a background thread.

For synchronous tests and for benchmarks that must not share the client's loop:

    with run_in_thread(SimulatorSettings()) as sim:
        ...  # sim.base_url, sim.store, sim.set_faults(...) from any thread
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator

from connector.simulator.server import ThreadsApiSimulator
from connector.simulator.settings import BehaviorSpec, FaultSpec, SimulatorSettings
from connector.simulator.store import ThreadStore

_Started = tuple[asyncio.AbstractEventLoop, ThreadsApiSimulator, asyncio.Event]


class SimulatorThread:
    """A handle on a simulator running in another thread; every method is thread-safe."""

    def __init__(
        self, simulator: ThreadsApiSimulator, loop: asyncio.AbstractEventLoop, timeout_s: float
    ) -> None:
        self._simulator = simulator
        self._loop = loop
        self._timeout_s = timeout_s
        self.base_url = simulator.base_url
        self.settings = simulator.settings

    @property
    def store(self) -> ThreadStore:
        """The record of created threads (its methods take a lock)."""
        return self._simulator.store

    @property
    def behavior(self) -> BehaviorSpec:
        return self._simulator.behavior

    def set_behavior(self, behavior: BehaviorSpec) -> None:
        self._call(lambda: self._simulator.set_behavior(behavior))

    def set_faults(self, faults: FaultSpec) -> None:
        self._call(lambda: self._simulator.set_faults(faults))

    def set_rate_limit(self, per_s: float | None, burst: int | None = None) -> None:
        self._call(lambda: self._simulator.set_rate_limit(per_s, burst))

    def reset(self) -> None:
        self._call(self._simulator.reset)

    def _call(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the simulator's loop and wait for it."""

        async def invoke() -> None:
            action()

        asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(self._timeout_s)


@contextlib.contextmanager
def run_in_thread(
    settings: SimulatorSettings | None = None, *, timeout_s: float = 10.0
) -> Iterator[SimulatorThread]:
    """Start the simulator in a daemon thread; stop it and join the thread on exit."""
    started: concurrent.futures.Future[_Started] = concurrent.futures.Future()

    async def serve() -> None:
        simulator = ThreadsApiSimulator(settings)
        stop = asyncio.Event()
        async with simulator:
            started.set_result((asyncio.get_running_loop(), simulator, stop))
            await stop.wait()

    def target() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            if started.done():
                raise
            started.set_exception(exc)

    thread = threading.Thread(target=target, name="threads-api-simulator", daemon=True)
    thread.start()
    loop, simulator, stop = started.result(timeout_s)
    try:
        yield SimulatorThread(simulator, loop, timeout_s)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(simulator.settings.shutdown_timeout_s + timeout_s)
