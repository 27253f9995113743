"""Model logic behind both front doors: a request resolved, checked against its signature and the
limits, then batched onto the backend.

Transport-free: the gRPC and REST adapters :meth:`Predictor.resolve` a request's model, version
and signature first (``ray_app.versions`` picks the version), check what the request *declares*
against it (:meth:`Predictor.check_declared`) before decoding any tensor, then :meth:`Predictor.run`
the decoded inputs and turn the :class:`InferenceResult` back into their own format. Encoded images
are decoded by ``ray_app.decode_pool``; ``ray_app.batcher`` gathers requests into backend calls.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ray_app import declared as declared_checks
from ray_app.backends.base import Backend, VersionState
from ray_app.batcher import Batcher, BatchItem
from ray_app.budget import ByteBudget
from ray_app.config import AppConfig, LiveConfig
from ray_app.decode_pool import DecodePool
from ray_app.metrics import AppMetrics
from ray_app.offload import Offloader
from ray_app.protocol.names import IMAGE_BYTES_INPUT, IMAGE_BYTES_SIGNATURE, IMAGES_INPUT, SERVING_DEFAULT
from ray_app.signatures import IMAGE_BYTES_SPEC, SignatureSpec, lookup
from ray_app.versions import VersionRouter


@dataclass(frozen=True)
class InferenceRequest:
    """A request with decoded inputs (what tests and in-process callers build)."""

    model_name: str
    inputs: dict[str, np.ndarray]
    signature_name: str = ""  # "" means serving_default
    version: int | None = None
    version_label: str | None = None
    output_filter: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """A request's model, version and signature, resolved against what is loaded."""

    model_name: str
    version: int
    pinned: bool  # the client named the version (by number or label); False: latest/canary
    signature_name: str  # never empty: "" resolves to serving_default
    spec: SignatureSpec


@dataclass(frozen=True)
class InferenceResult:
    model_name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


class Predictor:
    """One per replica process (its batcher's queue is the replica's)."""

    def __init__(
        self,
        config: AppConfig,
        backend: Backend,
        rng: random.Random | None = None,
        metrics: AppMetrics | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._versions = VersionRouter(config.model_name, backend, rng, metrics)
        self._metrics = metrics
        self._decode_pool = DecodePool(config.limits)  # encoded images: never on inference's threads
        self._batcher = Batcher(backend, config.backend_timeout_s, metrics)
        limits = config.limits
        self.inflight_bytes = ByteBudget(limits.max_inflight_bytes, limits.retry_after_s)
        self._offloader = Offloader(
            limits.offload_threads,
            limits.offload_min_bytes,
            limits.offload_processes,
            limits.offload_process_min_bytes,
        )

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, live: LiveConfig) -> None:
        """Apply new live settings (batch limits, labels, canary share) without a restart."""
        self._versions.live = live
        self._batcher.set_limits(live.max_batch_size, live.batch_wait_timeout_s)
        self.backend.set_pinned_versions(live.version_labels.values())

    def close(self) -> None:
        self._decode_pool.close()
        self._offloader.close()

    async def offload(self, size_bytes: int, fn, *args):
        """``fn(*args)``: CPU work on ``size_bytes`` of request content, off the event loop unless
        it is small (``ray_app.offload``)."""
        return await self._offloader.run(size_bytes, fn, *args)

    async def offload_isolated(self, size_bytes: int, fn, *args):
        """As :meth:`offload`, in a decoding process when large (``fn``, its arguments and its
        result pickle)."""
        return await self._offloader.run_isolated(size_bytes, fn, *args)

    def start_offloading(self) -> None:
        """Spawns the replica's decoding processes (at its start, not on the first large body)."""
        self._offloader.start()

    # -- versions (ray_app.versions) ------------------------------------------------------------
    @property
    def live(self) -> LiveConfig:
        return self._versions.live

    def check_model(self, name: str, version: int | None = None) -> None:
        self._versions.check_model(name, version)

    def resolve_version(self, version: int | None, label: str | None) -> tuple[int, bool]:
        return self._versions.resolve(version, label)

    def status(self, model_name: str, version: int | None) -> dict[int, VersionState]:
        return self._versions.status(model_name, version)

    def signatures(self, version: int) -> dict[str, SignatureSpec]:
        """The model's signatures plus the app's image-bytes signature."""
        specs = dict(self.backend.signatures(version))
        if SERVING_DEFAULT in specs:
            specs[IMAGE_BYTES_SIGNATURE] = IMAGE_BYTES_SPEC
        return specs

    def resolve_model(
        self, model_name: str, version: int | None = None, label: str | None = None
    ) -> tuple[int, bool]:
        """The version that answers, and whether the client named it: TF Serving's NOT_FOUND /
        FAILED_PRECONDITION answers, before any input is read."""
        self.check_model(model_name, version)
        return self.resolve_version(version, label)

    def resolve(
        self, model_name: str, version: int | None = None, label: str | None = None, signature_name: str = ""
    ) -> Target:
        """Which version and signature answer: TF Serving's NOT_FOUND / INVALID_ARGUMENT /
        FAILED_PRECONDITION answers, before any input is read."""
        resolved, pinned = self.resolve_model(model_name, version, label)
        signature = signature_name or SERVING_DEFAULT
        spec = lookup(self.signatures(resolved), signature)
        return Target(self.config.model_name, resolved, pinned, signature, spec)

    # -- inputs --------------------------------------------------------------------------------
    def check_declared(
        self,
        target: Target,
        declared: Mapping[str, tuple[int, tuple[int, ...]]],
        output_filter: Sequence[str],
    ) -> None:
        """TF Serving's checks on what a request declares, then the limits, before decoding
        anything (``ray_app.declared.check_declared``)."""
        declared_checks.check_declared(
            target.spec, target.signature_name, declared, output_filter, self.config.limits
        )

    def max_elements(self, dtype: np.dtype) -> int:
        """The most elements one decoded input of ``dtype`` may have (see :meth:`check_declared`)."""
        return declared_checks.max_elements(dtype, self.config.limits)

    # -- inference -----------------------------------------------------------------------------
    async def predict(self, request: InferenceRequest, deadline_s: float | None = None) -> InferenceResult:
        """Resolve and run a request whose inputs are already decoded (tests, in-process callers)."""
        target = self.resolve(
            request.model_name, request.version, request.version_label, request.signature_name
        )
        return await self.run(target, request.inputs, request.output_filter, deadline_s=deadline_s)

    async def run(
        self,
        target: Target,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
        *,
        declared_checked: bool = False,
        deadline_s: float | None = None,
    ) -> InferenceResult:
        """Check decoded inputs, batch them with other requests, and run them on the backend.

        ``declared_checked``: :meth:`check_declared` already passed for exactly these inputs (they
        were decoded to their declared dtypes and shapes), so the checks are not repeated.
        ``deadline_s`` (``time.monotonic()``): when the caller stops waiting. A request still
        queued then is dropped before the model runs (DEADLINE_EXCEEDED, counted in
        ``mnist_requests_expired_total``); the backend call gets at most the time left.
        """
        if declared_checked:
            size = target.spec.batch_size(target.signature_name, {k: v.shape for k, v in inputs.items()})
        else:
            size = target.spec.check_inputs(target.signature_name, inputs)
            for alias, array in inputs.items():
                declared_checks.check_size(alias, array.dtype, array.shape, self.config.limits)
            target.spec.check_output_filter(output_filter)
        run_signature, run_inputs = target.signature_name, dict(inputs)
        if run_signature == IMAGE_BYTES_SIGNATURE:
            run_signature = SERVING_DEFAULT
            run_inputs = {IMAGES_INPUT: await self._decode_pool.decode(inputs[IMAGE_BYTES_INPUT])}
        item = BatchItem(
            target.version, target.pinned, run_signature, run_inputs, tuple(output_filter), size,
            deadline_s=deadline_s,
        )  # fmt: skip
        result = await self._batcher.run(item)
        if self._metrics is not None:
            self._metrics.answered(item.version, target.signature_name, size)
        return InferenceResult(target.model_name, item.version, target.signature_name, result)
