"""Loopback port helpers shared by the local pipeline, benchmarks and tests."""

from __future__ import annotations

import socket

from ray_app.front_door import HAPROXY_SWITCH, SIDE_PORT_VARIABLES

# Serve hands out its direct-ingress ports (replicas' own HTTP and gRPC servers in HAProxy mode)
# from these ranges without checking that they are free; a port picked from the ephemeral range
# may fall in there and be handed to a replica of another cluster on this machine a moment later.
SERVE_DIRECT_INGRESS_RANGES = ((30000, 31000), (40000, 41000))


def free_port() -> int:
    """A TCP port free right now on loopback and outside Serve's direct-ingress ranges (whoever
    needs it binds it a moment later)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not any(low <= port <= high for low, high in SERVE_DIRECT_INGRESS_RANGES):
            return port


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on ``port`` on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def with_free_side_ports(env: dict[str, str]) -> dict[str, str]:
    """The front door's ``env`` with free ports for HAProxy mode's side ports, so that several
    clusters (tests, benchmarks) can run on one machine; unchanged in Python-proxy mode."""
    if env.get(HAPROXY_SWITCH) == "1":
        env.update({variable: str(free_port()) for variable in SIDE_PORT_VARIABLES})
    return env
