"""Typed configuration of the serving application, validated once at the edge.

``AppConfig`` is the ``args:`` block of a Serve config file (fixed for a deployment's
life); ``LiveConfig`` is its ``user_config:`` block, which ``serve deploy`` changes on
running replicas through ``reconfigure()`` without a restart.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackendKind = Literal["auto", "embedded", "tfserving", "remote"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TFServingOptions(_Strict):
    """How a replica runs its own ``tensorflow_model_server`` child process."""

    binary: str = Field(
        default="tensorflow_model_server", description="the binary: a name on PATH or an absolute path"
    )
    enable_batching: bool = Field(
        default=False, description="TF Serving's own batching (`--enable_batching`), under ours"
    )
    batching_parameters_file: str | None = Field(
        default=None, description="TF Serving's `--batching_parameters_file` (with `enable_batching`)"
    )
    per_process_gpu_memory_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="share of the GPU's memory the child may take (TF Serving's flag of that name)",
    )
    file_system_poll_wait_seconds: int = Field(
        default=1, ge=1, description="how often the child looks for new versions in the model store"
    )
    startup_timeout_s: float = Field(
        default=60.0, gt=0, description="how long a started child may take to answer on its socket"
    )
    restart_backoff_s: float = Field(
        default=1.0, ge=0, description="wait before restarting a child that died"
    )
    extra_flags: list[str] = Field(
        default_factory=list, description="more `tensorflow_model_server` flags, passed as they are"
    )


class Limits(_Strict):
    """Guards applied before any work is done for a request (each refusal is RESOURCE_EXHAUSTED / 429).

    A request's declared sizes (message length, Content-Length, tensor shapes, image headers) are
    compared with these before anything is allocated or decoded.
    """

    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="a request body (message or HTTP body); also bounds decoded tensors",
    )
    max_images_per_request: int = Field(
        default=1024, gt=0, description="images in one request (also the shape a tensor declares)"
    )
    max_image_pixels: int = Field(
        default=4_000_000, gt=0, description="one encoded image, from its header (decompression bombs)"
    )
    max_request_pixels: int = Field(
        default=16_000_000, gt=0, description="all encoded images of one request, from their headers"
    )
    max_image_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="one encoded image")
    decode_threads: int = Field(
        default=1, ge=1, description="image decoding threads of a replica, not shared with inference"
    )
    max_pending_decodes: int = Field(
        default=16,
        ge=1,
        description="image-bytes requests decoding or waiting for it; beyond, new ones are refused "
        "(tensor requests are unaffected)",
    )
    max_execution_batch_size: int = Field(
        default=128,
        gt=0,
        description="images per model call of the embedded backend: a larger batch or request runs in "
        "slices of this many, so the model's activations stay bounded (TF Serving's "
        "max_execution_batch_size; docs/limits.md)",
    )
    max_json_composites: int = Field(
        default=65_536,
        gt=0,
        description="lists, objects and strings in one REST JSON body, counted on its bytes before parsing "
        "(each costs ~60-90 bytes of Python objects; 1024 MNIST images as nested lists need ~30,000)",
    )
    max_inflight_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="request bytes (HTTP bodies by Content-Length, gRPC messages) one replica holds at once; "
        "beyond, RESOURCE_EXHAUSTED / 429 with Retry-After; at least max_request_bytes (docs/limits.md)",
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="the Retry-After of refusals by max_inflight_bytes"
    )
    offload_min_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description="parsing, decoding and rendering of a request's content above this size run on "
        "offload_threads threads instead of the event loop Serve's servers share with us",
    )
    offload_threads: int = Field(default=1, ge=1, description="threads for that work, per replica")
    offload_process_min_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="REST bodies above this size are decoded in the replica's decoding processes, "
        "where their parse cannot hold the replica's GIL",
    )
    offload_processes: int = Field(
        default=1,
        ge=0,
        description="decoding processes per replica, at the lowest CPU priority (0: none, threads only)",
    )

    @model_validator(mode="after")
    def _budget_holds_one_request(self) -> Limits:
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError("max_inflight_bytes must be >= max_request_bytes (one largest request must fit)")
        return self


class IntegrityOptions(_Strict):
    """How a replica checks a version's manifest (``ray_app.manifest``) before it loads or serves
    it; a version that does not match is refused (docs/security.md)."""

    require_manifest: bool = Field(
        default=True, description="false: versions without a manifest load (stores not yet sealed)"
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM files); with any, only versions signed by one of them load",
    )


class AuthOptions(_Strict):
    """Bearer tokens on the data path (``ray_app.auth``; docs/security.md). Off without a file."""

    token_file: str | None = Field(
        default=None,
        description="one token a line; re-read when it changes (rotation, no redeploy); unset: no tokens",
    )
    reload_interval_s: float = Field(
        default=1.0, gt=0, description="how often the token file is looked at, at most"
    )


class AppConfig(_Strict):
    """The serving app: which model, from where, through which backend."""

    model_name: str = Field(
        default="mnist",
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="the model's name in requests (`MODEL_NAME` overrides it)",
    )
    model_base_path: str = Field(
        default="models/mnist",
        description="the model store: integer version directories (`$MODEL_BASE_PATH/$MODEL_NAME` overrides it)",
    )
    backend: BackendKind = Field(
        default="auto",
        description="`tfserving` (a `tensorflow_model_server` child per replica), `remote` (an existing TF "
        "Serving), `embedded` (TensorFlow in the replica), `auto` (`tfserving` when the binary is on PATH, "
        "else `embedded`)",
    )
    remote_address: str | None = Field(
        default=None, description="host:port of an existing TF Serving (needed by `backend: remote`)"
    )
    poll_interval_s: float = Field(default=2.0, gt=0, description="how often replicas look for new versions")
    num_versions: int = Field(
        default=2, ge=1, description="the latest N versions kept loaded (pinned requests)"
    )
    backend_timeout_s: float = Field(default=10.0, gt=0, description="deadline of each backend call")
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request's time when its client states none (HTTP x-request-timeout-seconds, gRPC "
        "deadline); keep it equal to http_options/grpc_options.request_timeout_s. Expired requests never "
        "reach the model",
    )
    load_retry_initial_s: float = Field(default=2.0, gt=0, description="backoff after a failed version load")
    load_retry_max_s: float = Field(default=300.0, gt=0, description="the backoff doubles up to this")
    tfserving: TFServingOptions = Field(
        default_factory=TFServingOptions, description="the `tfserving` backend's child process (below)"
    )
    limits: Limits = Field(
        default_factory=Limits, description="checked before any work is done for a request (below)"
    )
    integrity: IntegrityOptions = Field(
        default_factory=IntegrityOptions, description="version manifests checked before loading (below)"
    )
    auth: AuthOptions = Field(
        default_factory=AuthOptions, description="bearer tokens on the data path (below)"
    )

    @model_validator(mode="after")
    def _remote_needs_address(self) -> AppConfig:
        if self.backend == "remote" and not self.remote_address:
            raise ValueError("backend 'remote' needs remote_address (host:port)")
        return self

    def with_env_overrides(self, environ: dict[str, str] | None = None) -> AppConfig:
        """Apply TF Serving's Docker conventions: ``$MODEL_BASE_PATH/$MODEL_NAME``."""
        env = os.environ if environ is None else environ
        name = env.get("MODEL_NAME") or None
        base = env.get("MODEL_BASE_PATH") or None
        if not name and not base:
            return self
        update: dict[str, str] = {}
        if name:
            update["model_name"] = name
        if base:
            update["model_base_path"] = os.path.join(base, name or self.model_name)
        return self.model_validate({**self.model_dump(), **update})


class LiveConfig(_Strict):
    """Settings that change on running replicas (Serve ``user_config``)."""

    max_batch_size: int = Field(
        default=32, ge=1, description="images in one backend call (counted in images, not requests)"
    )
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, description="how long a batch waits to fill (`serve_configs/local.yaml` says why)"
    )
    version_labels: dict[str, int] = Field(
        default_factory=dict, description="labels to versions, kept loaded: e.g. `{stable: 1, canary: 2}`"
    )
    canary_traffic_percent: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="share of unpinned requests sent to the `canary` label (the rest: `stable`, else the latest)",
    )

    @model_validator(mode="after")
    def _canary_needs_label(self) -> LiveConfig:
        if self.canary_traffic_percent > 0 and "canary" not in self.version_labels:
            raise ValueError("canary_traffic_percent > 0 needs a 'canary' entry in version_labels")
        for label, version in self.version_labels.items():
            if version < 1:
                raise ValueError(f"version label {label!r} -> {version}: versions are positive")
        return self
