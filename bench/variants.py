"""What the benchmark compares: each variant (the baseline server, the Serve app behind a front
door, with tokens, TLS or an edge), the default set, and a running server's handle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONCURRENCIES = (1, 8, 32)
IMAGES_PER_REQUEST = (1, 32)
BASELINE = "baseline-batched"


@dataclass(frozen=True)
class Variant:
    """One server set-up to measure."""

    name: str
    kind: str  # "baseline" | "serve"
    description: str
    batching: bool = True  # baseline: in-process batcher on/off
    front_door: str = "haproxy"  # serve: "haproxy" (HAProxy + direct ingress) | "python-proxy"
    max_batch_size: int | None = None  # serve: None keeps the config's user_config value
    batch_wait_timeout_s: float | None = None  # serve: None keeps the config's
    num_replicas: int | None = None  # serve: None keeps the config's
    grpc_request_timeout: bool = True  # serve: False drops grpc_options.request_timeout_s
    edge: str | None = None  # serve: "plaintext" | "tls": the load goes through ray_app.edge in front
    tokens: bool = False  # serve: bearer tokens on the data path (args.auth), sent by every client call
    concurrencies: tuple[int, ...] = CONCURRENCIES
    images_per_request: tuple[int, ...] = IMAGES_PER_REQUEST
    protocol: str = "tf_serving"  # the clients': tf_serving (Predict) | oip (ModelInfer, docs/oip.md)


VARIANTS = {
    v.name: v
    for v in (
        Variant(BASELINE, "baseline", "hand-written grpc.aio + batcher (32 images / 2 ms), no Ray"),
        Variant("baseline-unbatched", "baseline", "hand-written grpc.aio, one model call per request", False),
        Variant(
            "ray-haproxy",
            "serve",
            "serve_configs/local.yaml as users get it: HAProxy + direct ingress, 2 replicas",
        ),
        Variant(
            "ray-haproxy-oip",
            "serve",
            "ray-haproxy, clients on the Open Inference Protocol (gRPC ModelInfer, raw tensors)",
            protocol="oip",
        ),
        Variant(
            "ray-python-proxy",
            "serve",
            "serve_configs/local.yaml through Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=0, the fallback)",
            front_door="python-proxy",
        ),
        Variant(
            "ray-haproxy-1replica",
            "serve",
            "ray-haproxy with one replica (one process, one GIL)",
            num_replicas=1,
        ),
        Variant(
            "ray-haproxy-wait0",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0: a batch takes what queued while the last one ran",
            batch_wait_timeout_s=0.0,
        ),
        Variant(
            "ray-haproxy-wait2ms",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0.002 (the config's value until 2026-11-30; now 0.01)",
            batch_wait_timeout_s=0.002,
        ),
        Variant(
            "ray-haproxy-wait20ms",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0.02 (config: 0.01)",
            batch_wait_timeout_s=0.02,
        ),
        Variant(
            "ray-haproxy-no-grpc-timeout",
            "serve",
            "ray-haproxy without grpc_options.request_timeout_s (no timeout task per request)",
            grpc_request_timeout=False,
        ),
        Variant(
            "ray-haproxy-edge",
            "serve",
            "ray-haproxy behind the edge (ray_app/edge: a second HAProxy on the client ports), plaintext",
            edge="plaintext",
        ),
        Variant(
            "ray-haproxy-edge-tls",
            "serve",
            "ray-haproxy behind the edge with TLS (gRPC over TLS 1.3, P-256 certificate)",
            edge="tls",
        ),
        Variant(
            "ray-haproxy-tokens",
            "serve",
            "ray-haproxy with bearer tokens on the data path (every call checked by the replica)",
            tokens=True,
        ),
        Variant(
            "ray-haproxy-1replica-tokens",
            "serve",
            "ray-haproxy-1replica with bearer tokens on the data path (for profile_replica.py)",
            num_replicas=1,
            tokens=True,
        ),
        Variant(
            "ray-haproxy-edge-tls-tokens",
            "serve",
            "ray-haproxy behind the edge with TLS, and bearer tokens on the data path",
            edge="tls",
            tokens=True,
        ),
        Variant(
            "ray-haproxy-unbatched",
            "serve",
            "ray-haproxy with max_batch_size 1 (no batching)",
            max_batch_size=1,
            concurrencies=(32,),
        ),
    )
}
DEFAULT_VARIANTS = (
    BASELINE,
    "baseline-unbatched",
    "ray-haproxy",
    "ray-haproxy-oip",
    "ray-python-proxy",
    "ray-haproxy-1replica",
)


@dataclass
class Running:
    """A started server: where to send load, plus what was learnt while starting it."""

    target: str
    notes: dict[str, Any] = field(default_factory=dict)
    sid: int | None = None  # the server's session, for CPU accounting
    batch_metrics: Callable[[], dict[str, float] | None] | None = None  # images and backend calls so far
    root_certificates: bytes | None = None  # TLS: the CA to trust (None: plaintext)
    token: str | None = None  # bearer token the app wants (None: tokens off)
    edge_pids: Callable[[], set[int]] | None = None  # the edge's HAProxy processes, for CPU accounting
