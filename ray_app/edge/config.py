"""The edge's typed configuration (a YAML file, ``serve_configs/edge/*.yaml``), validated once.

TLS settings carry the names of TF Serving's ``SSLConfig`` (``server_key``, ``server_cert``,
``custom_ca``, ``client_verify``; tensorflow_serving/config/ssl_config.proto), as paths to PEM
files rather than their contents, so that certificates can be rotated by replacing files and
reloading the edge (docs/tls.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    """TLS on both public ports; mutual TLS when ``client_verify`` is on."""

    server_cert: Path = Field(description="PEM certificate chain the edge presents (leaf first)")
    server_key: Path = Field(description="PEM private key of server_cert")
    custom_ca: Path | None = Field(
        default=None, description="PEM CA certificates that sign the client certificates accepted"
    )
    client_verify: bool = Field(
        default=False,
        description="mutual TLS: refuse a client without a certificate signed by custom_ca",
    )

    @model_validator(mode="after")
    def _verify_needs_a_ca(self) -> TLSConfig:
        if self.client_verify and self.custom_ca is None:
            raise ValueError("client_verify needs custom_ca (the CA that signs client certificates)")
        return self


class SlowClientLimits(_Strict):
    """What a client may cost the edge before a request reaches a replica.

    A request is forwarded only once it has fully arrived (HAProxy's ``option http-buffer-request``),
    or once ``max_buffered_request_bytes`` of it have arrived for larger bodies; either must
    happen within ``request_timeout_s`` of its first byte, or the edge answers 408 and closes.
    """

    request_timeout_s: float = Field(
        default=5.0, gt=0, description="time to send headers and body (or its first buffer) of a request"
    )
    max_buffered_request_bytes: int = Field(
        default=1024 * 1024,
        ge=16 * 1024,
        le=64 * 1024 * 1024,
        description="largest request held whole at the edge before forwarding (HAProxy tune.bufsize)",
    )
    client_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="a client silent this long, in the middle of a request, is cut"
    )
    keep_alive_timeout_s: float = Field(
        default=90.0, gt=0, description="an idle connection between requests is closed after this"
    )
    max_connections: int = Field(default=4096, ge=1, description="client connections at once, in all")
    max_connections_per_source: int = Field(
        default=512, ge=1, description="client connections at once from one IP address (beyond: refused)"
    )


class Upstream(_Strict):
    """Ray's own HAProxy (the Serve ports of the Serve config), which the edge forwards to."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(ge=1, le=65535)
    http_port: int = Field(ge=1, le=65535)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    server_timeout_s: float = Field(
        default=60.0, gt=0, description="no answer from Ray's HAProxy for this long: 504"
    )


class EdgeConfig(_Strict):
    """One node's edge: public gRPC and HTTP ports, optional TLS, limits, Ray's HAProxy behind."""

    bind_host: str = Field(default="0.0.0.0", description="address of the public ports")
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    http_port: int = Field(default=8000, ge=1, le=65535)
    upstream: Upstream
    tls: TLSConfig | None = None
    limits: SlowClientLimits = SlowClientLimits()
    threads: int | None = Field(
        default=None, ge=1, le=64, description="HAProxy threads (default: one per 4 CPUs of the node, 1 to 4)"
    )
    certificate_check_interval_s: float = Field(
        default=10.0, gt=0, description="how often the TLS files are checked; changed files are reloaded"
    )
    drain_timeout_s: float = Field(
        default=60.0, gt=0, description="on reload or stop, how long old connections may finish"
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> EdgeConfig:
        if self.grpc_port == self.http_port:
            raise ValueError("grpc_port and http_port must differ")
        return self


def load(path: Path) -> EdgeConfig:
    """An :class:`EdgeConfig` from a YAML file; relative certificate paths are relative to the file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    tls = raw.get("tls")
    if isinstance(tls, dict):
        base = Path(path).resolve().parent
        for key in ("server_cert", "server_key", "custom_ca"):
            if tls.get(key):
                tls[key] = str(base / Path(tls[key]).expanduser())
    return EdgeConfig.model_validate(raw)
