"""``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a thread of their own.

Why not on the pipeline's event loop: every request there takes turns with the fetch,
call and commit work, so a flood of scrapes (or a port scanner) slowed event processing
and pushed probe answers past the kubelet's timeout. Here the server runs its own event
loop in a daemon thread and defends itself:

- at most ``max_connections`` connections are served at once; further ones wait in the
  kernel's listen backlog (nothing is accepted that cannot be served);
- a client gets ``header_timeout_s`` to send its request line and headers (and as long to
  read the answer), then the connection is closed: slow-header connections cannot pile up;
- one request per connection, at most 8 KiB of head, GET/HEAD only;
- a rendered ``/metrics`` body is reused for ``metrics_cache_s``, so a flood of scrapes
  costs a copy, not a render of the registry each;
- the ``Server`` header names no version.

The checks run in this thread: they must only read simple attributes of the connector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import typing
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], tuple[bool, str]]
log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 8 * 1024
SERVER_NAME = "threads-connector"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {503: "Service Unavailable", 500: "Internal Server Error"}


class HealthServer:
    """The operational endpoints; ``port=0`` picks a free port (see ``port`` after start)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        live: Check,
        ready: Check,
        *,
        max_connections: int = 64,
        header_timeout_s: float = 5.0,
        metrics_cache_s: float = 1.0,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._live = live
        self._ready = ready
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s
        self._metrics_cache_s = metrics_cache_s
        self._cached: tuple[float, bytes] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.port = port
        self.served = 0  # requests answered (for tests and curiosity)

    async def start(self) -> None:
        """Bind (errors such as a port in use raise here) and serve from a new thread."""
        if self._thread is not None:
            return
        sock = _listen(self._host, self._port)
        self.port = int(sock.getsockname()[1])
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sock, started), name="health-server", daemon=True
        )
        self._thread.start()
        await asyncio.to_thread(started.wait)

    async def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, 10)
        self._thread = None

    # -- the server's own thread ------------------------------------------------------

    def _run(self, sock: socket.socket, started: threading.Event) -> None:
        try:
            asyncio.run(self._serve(sock, started))
        finally:
            sock.close()
            started.set()

    async def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        slots = asyncio.Semaphore(self._max_connections)
        open_connections: set[asyncio.Transport] = set()
        started.set()
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while True:
                accept = asyncio.create_task(_accept(sock, slots))
                await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not accept.done():
                    accept.cancel()
                    return
                try:
                    conn = accept.result()
                except OSError:
                    continue
                try:
                    await loop.connect_accepted_socket(
                        lambda: _Connection(self, slots, open_connections), conn
                    )
                except OSError:
                    conn.close()  # connection_lost never ran: the slot is still ours
                    slots.release()
        finally:
            stopping.cancel()
            for transport in list(open_connections):
                transport.abort()

    @property
    def header_timeout_s(self) -> float:
        return self._header_timeout_s

    def answer(self, head: bytes) -> tuple[int, str, bytes]:
        """Status, content type and body for a request head (called from the server's
        thread)."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        checks = {b"/healthz": self._live, b"/readyz": self._ready}
        check = checks.get(target)
        if check is None:
            return 404, "text/plain", b"not found\n"
        try:
            ok, detail = check()
        except Exception:
            log.exception("health check %s failed", target.decode())
            ok, detail = False, "the check itself failed"
        payload = orjson.dumps({"ok": ok, "detail": detail, "ts": time.time()})
        return (200 if ok else 503), "application/json", payload

    def _metrics(self) -> bytes:
        now = time.monotonic()
        cached = self._cached
        if cached is not None and now - cached[0] < self._metrics_cache_s:
            return cached[1]
        body = generate_latest(self._registry)
        self._cached = (now, body)
        return body


class _Connection(asyncio.Protocol):
    """One request: its head within the timeout (else hang up), one answer, close. A plain
    protocol: no reader/writer objects or task per connection."""

    def __init__(
        self,
        server: HealthServer,
        slots: asyncio.Semaphore,
        open_connections: set[asyncio.Transport],
    ) -> None:
        self._server = server
        self._slots = slots
        self._open = open_connections
        self._head = bytearray()
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = typing.cast(asyncio.Transport, transport)
        self._open.add(tcp)
        # for the head, and then again for a slow reader to take the answer
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.header_timeout_s, tcp.abort
        )

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if self._answered or transport is None:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                transport.abort()
            return
        self._answered = True
        head = bytes(self._head[:end])
        status, content_type, body = self._server.answer(head)
        with_body = not head.startswith(b"HEAD ")
        transport.write(_response(status, content_type, body, with_body=with_body))
        self._server.served += 1
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.header_timeout_s, transport.abort
        )
        transport.close()  # after the answer is flushed

    def eof_received(self) -> bool:
        return False  # the client closed its side before a full head: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._transport is not None:
            self._open.discard(self._transport)
        self._slots.release()


async def _accept(sock: socket.socket, slots: asyncio.Semaphore) -> socket.socket:
    """The next connection once a slot is free: beyond the limit, connections wait in the
    kernel's backlog, unaccepted (a slot taken here is released by the handler)."""
    await slots.acquire()
    try:
        conn, _address = await asyncio.get_running_loop().sock_accept(sock)
    except BaseException:
        slots.release()
        raise
    return conn


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _response(status: int, content_type: str, body: bytes, *, with_body: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
        f"Server: {SERVER_NAME}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (body if with_body else b"")
