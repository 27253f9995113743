"""The local-run tools (client/local/): each run's HAProxy state directory, and free ports that
stay clear of Serve's and of the front door's own."""

from __future__ import annotations

import socket
from pathlib import Path

from client.local import leftovers, ports
from ray_app.front_door import HAPROXY_SWITCH, SIDE_PORT_VARIABLES, front_door_env


def test_a_run_gets_its_own_short_haproxy_state_dir() -> None:
    state_dir = leftovers.new_state_dir()
    try:
        env = front_door_env(2, state_dir=state_dir, environ={})
        socket = env["RAY_SERVE_HAPROXY_SOCKET_PATH"]
        assert socket.startswith(state_dir) and len(f"{state_dir}/{'0' * 56}/metrics.sock") <= 97
    finally:
        Path(state_dir).rmdir()


def test_side_ports_are_moved_to_free_ones_in_haproxy_mode_only() -> None:
    haproxy = ports.with_free_side_ports(front_door_env(2, state_dir="/tmp/x", environ={}))
    side = [int(haproxy[variable]) for variable in SIDE_PORT_VARIABLES]
    assert len(set(side)) == 4 and 8404 not in side and 9101 not in side
    python_proxy = front_door_env(2, state_dir="/tmp/x", environ={HAPROXY_SWITCH: "0"})
    assert ports.with_free_side_ports(dict(python_proxy)) == python_proxy


def test_free_ports_stay_out_of_serves_direct_ingress_ranges(monkeypatch):
    """Serve hands those ports to replicas without checking them: a side port (or a test's port)
    picked there collides with another cluster's replica."""
    offered = iter([30500, 40259, 41000, 52000, 30000, 53000])

    class Socket:
        def __init__(self, *args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", Socket)
    assert [ports.free_port(), ports.free_port()] == [52000, 53000]
