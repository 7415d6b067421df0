"""The simulator's mutable state: apps, behaviour (latency, faults, rate limit), the store.

All of it lives on the server's event loop, except the store, which is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from connector.simulator.faults import FaultModel, LatencySampler
from connector.simulator.ratelimit import TokenBucket
from connector.simulator.settings import BehaviorSpec, HostileMode, SimulatorSettings
from connector.simulator.store import ThreadStore


class SimulatorState:
    """Everything the request handlers share."""

    behavior: BehaviorSpec
    _hostile_left: int | None
    faults: FaultModel
    latency: LatencySampler
    bucket: TokenBucket | None

    def __init__(
        self, settings: SimulatorSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.store = ThreadStore()
        self._clock = clock
        self._stopping = asyncio.Event()
        self._rng = random.Random(settings.seed)
        self._ids: random.Random | None = None
        self.behavior = settings.behavior()
        self.bucket = None
        self.reset()

    def set_behavior(self, behavior: BehaviorSpec) -> None:
        """Replace latency, faults and rate limit (a new, full bucket if the limit changed)."""
        same_limit = (behavior.rate_limit_per_s, behavior.burst) == (
            self.behavior.rate_limit_per_s,
            self.behavior.burst,
        )
        self.behavior = behavior
        self._hostile_left = behavior.hostile.count
        self.faults = FaultModel(behavior.faults, self._rng)
        self.latency = LatencySampler(behavior.latency, self._rng)
        if not same_limit:
            self.bucket = self._new_bucket()

    def take_hostile(self) -> HostileMode:
        """The misbehaviour for this request (``none`` once ``count`` is spent)."""
        mode = self.behavior.hostile.mode
        if mode == "none" or self._hostile_left is None:
            return mode
        if self._hostile_left <= 0:
            return "none"
        self._hostile_left -= 1
        return mode

    def _new_bucket(self) -> TokenBucket | None:
        per_s = self.behavior.rate_limit_per_s
        return None if per_s is None else TokenBucket(per_s, self.behavior.burst, self._clock)

    def reset(self) -> None:
        """Forget created threads and counts, re-seed, refill the bucket; keep behaviour."""
        self.store.clear()
        seed = self.settings.seed
        self._rng.seed(seed)
        self._ids = random.Random(seed) if seed is not None else None
        self.set_behavior(self.behavior)
        self.bucket = self._new_bucket()

    def auth_status(self, app_uid: str, api_key: str | None) -> int | None:
        """401 without a key, 403 if the key is not this app's (or the app is unknown)."""
        if not api_key:
            return 401
        app = self.settings.apps.get(app_uid)
        expected = app.api_key.get_secret_value() if app is not None else ""
        if app is None or not hmac.compare_digest(api_key.encode(), expected.encode()):
            return 403
        return None

    def agent_exists(self, app_uid: str, agent: str) -> bool:
        agents = self.settings.apps[app_uid].agents
        return not agents or agent in agents

    def new_thread_uid(self) -> str:
        if self._ids is None:
            return f"th_{uuid.uuid4().hex}"
        return f"th_{uuid.UUID(int=self._ids.getrandbits(128), version=4).hex}"

    # -- lifecycle ----------------------------------------------------------------------

    def begin(self) -> None:
        """Called when the server starts serving."""
        self._stopping = asyncio.Event()

    def end(self) -> None:
        """Called when the server stops: sleeping requests wake up and answer."""
        self._stopping.set()

    async def until_stopped(self) -> None:
        """Wait until the server stops."""
        await self._stopping.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the server stops; True if it slept the full time."""
        if seconds <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
            return False
        return True


STATE = web.AppKey("threads_simulator_state", SimulatorState)
"""Where the aiohttp application keeps its ``SimulatorState``."""
