"""Loopback ports: picking free ones and checking whether one is free or open."""

from __future__ import annotations

import contextlib
import socket

from connector.localkafka.common import HOST


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free at the time of asking."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


class _PortTaken(Exception):
    pass
