"""Loopback networking helpers for tests: free ports and "is anything listening?" probes."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_tcp_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that nothing listens on right now.

    The port is released before returning, so another process could take it first; callers
    that bind it themselves should retry on `OSError` (or bind port 0 where the server allows).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tell whether a TCP connect to `host:port` succeeds within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
