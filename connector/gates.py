"""Gates that pause every call while a condition lasts, with one probe to end it.

- ``AuthGate``: the API refuses the key (401/403), or the key as read cannot be sent.
- ``CircuitBreaker``: the API cannot be reached or fails as a whole (connection and TLS
  failures, 5xx storms), after ``threshold`` such failures in a row.
- ``StartupGate``: the start-up probe found a wrong path (``connector.startup_checks``);
  only that probe opens it, no call does.

While a gate is closed, one caller at a time is the *probe*: it waits
``probe_interval_s`` and tries; the others wait for the gate to change. Events that wait
spend none of their retry budget, so a lasting outage or a bad key never dead-letters the
backlog; the probe's answer opens the gate and every waiting call goes on.
"""

from __future__ import annotations

import asyncio


class Gate:
    """Open (calls pass) or closed with a ``reason`` (for /readyz and the logs)."""

    def __init__(self, probe_interval_s: float = 30.0) -> None:
        self.probe_interval_s = probe_interval_s
        self.reason = ""
        self._closed = False
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return not self._closed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def take_probe(self) -> bool:
        """True when the gate is closed and this caller becomes its probe."""
        if self._closed and not self._probing:
            self._probing = True
            return True
        return False

    async def changed(self) -> None:
        """Until the gate opens, closes, or its probe ends."""
        await self._changed.wait()

    async def enter(self) -> bool:
        """Wait until a call may go; True when this caller is the probe."""
        while self._closed:
            if self.take_probe():
                return True
            await self.changed()
        return False

    def fail(self, was_probe: bool, reason: str = "") -> bool:
        """Close the gate. True when it was open until now."""
        was_open = not self._closed
        self._closed = True
        if reason:
            self.reason = reason
        self._end_probe(was_probe)
        return was_open

    def succeed(self, was_probe: bool) -> bool:
        """A call went through: open the gate. True when it was closed until now."""
        was_closed = self._closed
        self._closed = False
        self._end_probe(was_probe)
        return was_closed

    def _end_probe(self, was_probe: bool) -> None:
        if was_probe:
            self._probing = False
        self._notify()

    def abandon_probe(self) -> None:
        """The probe left without an answer (abandoned, cancelled, or an answer that says
        nothing about this gate): let another probe."""
        self._end_probe(True)


class AuthGate(Gate):
    """Closed while the API answers 401/403 or the key as read cannot be a header."""


class StartupGate(Gate):
    """Closed while the start-up probe is answered 404/405 (a wrong ``api.base_url``). It
    gives no call the probe: the start-up checks probe with a body that cannot create a
    thread, so a wrong path dead-letters nothing, not even a probing event."""

    def take_probe(self) -> bool:
        return False


class CircuitBreaker(Gate):
    """Closes (trips) after ``threshold`` transport failures in a row; any answer from the
    API resets the count and opens it."""

    def __init__(self, threshold: int = 5, probe_interval_s: float = 5.0) -> None:
        super().__init__(probe_interval_s)
        self.threshold = threshold
        self.consecutive = 0

    def failure(self, was_probe: bool, reason: str) -> bool:
        """One more transport failure. True when the breaker trips now."""
        self.consecutive += 1
        if self._closed or self.consecutive >= self.threshold:
            return self.fail(was_probe, reason)
        if was_probe:
            self.abandon_probe()
        return False

    def succeed(self, was_probe: bool) -> bool:
        self.consecutive = 0
        return super().succeed(was_probe)
