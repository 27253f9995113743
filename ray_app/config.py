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

    binary: str = "tensorflow_model_server"  # name on PATH or absolute path
    enable_batching: bool = False  # TF Serving's own batching, under ours
    batching_parameters_file: str | None = None
    per_process_gpu_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    file_system_poll_wait_seconds: int = Field(default=1, ge=1)
    startup_timeout_s: float = Field(default=60.0, gt=0)
    restart_backoff_s: float = Field(default=1.0, ge=0)
    extra_flags: list[str] = Field(default_factory=list)


class Limits(_Strict):
    """Guards applied before any work is done for a request (each refusal is RESOURCE_EXHAUSTED / 429).

    A request's declared sizes (message length, Content-Length, tensor shapes, image headers) are
    compared with these before anything is allocated or decoded.
    """

    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)  # body; also bounds decoded tensors
    max_images_per_request: int = Field(default=1024, gt=0)
    max_image_pixels: int = Field(default=4_000_000, gt=0)  # per encoded image: decompression-bomb guard
    max_request_pixels: int = Field(default=16_000_000, gt=0)  # all encoded images of one request
    max_image_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    decode_threads: int = Field(default=1, ge=1)  # image decoding threads, not shared with inference
    max_pending_decodes: int = Field(default=16, ge=1)  # image-bytes requests decoding or queued for it
    # Lists, objects and strings in one REST JSON body, counted on its bytes before parsing: each costs
    # ~60-90 bytes of Python objects (a number ~8). 1024 MNIST images as nested lists need ~30,000.
    max_json_composites: int = Field(default=65_536, gt=0)
    # Request bytes (HTTP bodies by Content-Length, gRPC messages) one replica holds at once; beyond,
    # RESOURCE_EXHAUSTED / 429 with Retry-After. At least max_request_bytes. docs/limits.md sizes it.
    max_inflight_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    retry_after_s: int = Field(default=1, ge=0)  # the Retry-After of refusals by max_inflight_bytes
    # Parsing, decoding and rendering of a request's content above this size run on offload_threads
    # threads instead of the event loop Serve's servers share with us.
    offload_min_bytes: int = Field(default=64 * 1024, ge=0)
    offload_threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _budget_holds_one_request(self) -> Limits:
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError("max_inflight_bytes must be >= max_request_bytes (one largest request must fit)")
        return self


class IntegrityOptions(_Strict):
    """How a replica checks a version's manifest (``training.integrity``) before it loads or serves
    it; a version that does not match is refused (docs/security.md)."""

    require_manifest: bool = True  # False: versions without a manifest load (stores not yet sealed)
    trusted_keys: list[str] = Field(default_factory=list)  # Ed25519 public keys (PEM files); any: signed only


class AuthOptions(_Strict):
    """Bearer tokens on the data path (``ray_app.auth``; docs/security.md). Off without a file."""

    token_file: str | None = None  # one token a line; re-read when it changes (rotation, no redeploy)
    reload_interval_s: float = Field(default=1.0, gt=0)  # how often the file is looked at, at most


class AppConfig(_Strict):
    """The serving app: which model, from where, through which backend."""

    model_name: str = Field(default="mnist", pattern=r"^[A-Za-z0-9_.\-]+$")
    model_base_path: str = "models/mnist"
    backend: BackendKind = "auto"
    remote_address: str | None = None  # host:port of an existing TF Serving (backend=remote)
    poll_interval_s: float = Field(default=2.0, gt=0)
    num_versions: int = Field(default=2, ge=1)  # latest N versions kept loaded
    backend_timeout_s: float = Field(default=10.0, gt=0)  # deadline of each backend RPC
    # A request's time when its client states none (HTTP x-request-timeout-seconds, gRPC deadline):
    # keep it equal to http_options/grpc_options.request_timeout_s. Expired requests never reach the model.
    request_timeout_s: float = Field(default=30.0, gt=0)
    load_retry_initial_s: float = Field(default=2.0, gt=0)  # backoff after a failed version load
    load_retry_max_s: float = Field(default=300.0, gt=0)  # the backoff doubles up to this
    tfserving: TFServingOptions = Field(default_factory=TFServingOptions)
    limits: Limits = Field(default_factory=Limits)
    integrity: IntegrityOptions = Field(default_factory=IntegrityOptions)
    auth: AuthOptions = Field(default_factory=AuthOptions)

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

    max_batch_size: int = Field(default=32, ge=1)  # counted in images, not requests
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)  # serve_configs/local.yaml says why
    version_labels: dict[str, int] = Field(default_factory=dict)  # e.g. {stable: 1, canary: 2}
    canary_traffic_percent: float = Field(default=0.0, ge=0, le=100)

    @model_validator(mode="after")
    def _canary_needs_label(self) -> LiveConfig:
        if self.canary_traffic_percent > 0 and "canary" not in self.version_labels:
            raise ValueError("canary_traffic_percent > 0 needs a 'canary' entry in version_labels")
        for label, version in self.version_labels.items():
            if version < 1:
                raise ValueError(f"version label {label!r} -> {version}: versions are positive")
        return self
