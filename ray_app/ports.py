"""Loopback port helpers shared by the sidecar launcher, the local pipeline, benchmarks and tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free right now on loopback (whoever needs it binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on ``port`` on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
