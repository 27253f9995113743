"""Model logic behind both front doors: version routing, input checks, batching, backend calls.

Transport-free: the gRPC and REST adapters :meth:`Predictor.resolve` a request's model, version
and signature first, check what the request *declares* against it
(:meth:`Predictor.check_declared`) before decoding any tensor, then :meth:`Predictor.run` the
decoded inputs and turn the :class:`InferenceResult` back into their own format. Batching uses
Ray Serve's ``@serve.batch``; a batch is split by (version, signature, inputs, output filter) so
different models never share a backend call, and it counts images, not requests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from ray_app import image_decoding, preprocessing
from ray_app.backends.base import Backend, VersionState
from ray_app.budget import ByteBudget
from ray_app.config import AppConfig, LiveConfig
from ray_app.metrics import AppMetrics
from ray_app.offload import Offloader
from ray_app.preprocessing import MNIST_SIZE_PX
from ray_app.protocol.names import IMAGE_BYTES_INPUT, IMAGE_BYTES_SIGNATURE, IMAGES_INPUT, SERVING_DEFAULT
from ray_app.protocol.status import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServingError,
)
from ray_app.protocol.tensors import STRING, element_count
from ray_app.signatures import IMAGE_BYTES_SPEC, SignatureSpec, lookup


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


@dataclass
class _Item:
    version: int
    pinned: bool
    signature: str
    inputs: dict[str, np.ndarray]
    output_filter: tuple[str, ...]
    size: int = field(default=1)
    queued_s: float = field(default_factory=time.monotonic)
    deadline_s: float | None = None  # time.monotonic() after which nobody waits for the answer

    def group_key(self) -> tuple:
        """Items that may share one backend call: same version, signature, output filter, and
        inputs that concatenate (same names, dtypes and shapes past the batch dimension)."""
        inputs = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.inputs.items()))
        return self.version, self.signature, inputs, self.output_filter


def _batch_images(items: list[_Item]) -> int:
    return sum(item.size for item in items)


def _for_image(exc: ServingError, index: int) -> ServingError:
    """The same error, naming the image it is about (the client maps the index back to a file)."""
    named = type(exc)(f"image {index}: {exc.message}")
    named.__dict__.update({k: v for k, v in exc.__dict__.items() if k != "message"})
    return named


def _servable_not_found(name: str, version: int | None) -> str:
    """TF Serving's NOT_FOUND text (``ServableRequest::DebugString``)."""
    request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
    return f"Servable not found for request: {request}"


class Predictor:
    """One per replica process: Ray Serve keeps a single batch queue per decorated method."""

    def __init__(
        self,
        config: AppConfig,
        backend: Backend,
        rng: random.Random | None = None,
        metrics: AppMetrics | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.live = LiveConfig()
        self._rng = rng or random.Random()
        self._metrics = metrics
        # Encoded images are decoded here, never on the threads inference uses: a few requests of
        # huge blank PNGs can then delay other image-bytes requests, not every request.
        self._decoder = ThreadPoolExecutor(config.limits.decode_threads, thread_name_prefix="decode")
        self._pending_decodes = 0  # image-bytes requests decoding or waiting for a decoder thread
        self._in_flight = 0  # requests between here and their answer from the backend
        limits = config.limits
        self.inflight_bytes = ByteBudget(limits.max_inflight_bytes, limits.retry_after_s)
        self._offloader = Offloader(limits.offload_threads, limits.offload_min_bytes)

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, live: LiveConfig) -> None:
        """Apply new live settings (batch limits, labels, canary share) without a restart."""
        self.live = live
        self._run_batch.set_max_batch_size(live.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.backend.set_pinned_versions(live.version_labels.values())

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._offloader.close()

    async def offload(self, size_bytes: int, fn, *args):
        """``fn(*args)``: CPU work on ``size_bytes`` of request content, off the event loop unless
        it is small (``ray_app.offload``)."""
        return await self._offloader.run(size_bytes, fn, *args)

    # -- versions ------------------------------------------------------------------------------
    def check_model(self, name: str, version: int | None = None) -> None:
        """TF Serving's answers for a missing or unknown model name."""
        if not name:
            raise InvalidArgumentError("ModelSpec has no name specified.")
        if name != self.config.model_name:
            raise NotFoundError(_servable_not_found(name, version))

    def resolve_version(self, version: int | None, label: str | None) -> tuple[int, bool]:
        """(version to run, whether the client pinned it), following labels and the canary share."""
        name = self.config.model_name
        loaded = self.backend.versions()
        labels = self.live.version_labels
        if label:
            if label not in labels:
                raise InvalidArgumentError(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is not None:  # 0 too: TF Serving serves a 0/ directory as version 0
            if version not in loaded:
                raise NotFoundError(_servable_not_found(name, version))
            return version, True
        if not loaded:
            raise NotFoundError(f"{_servable_not_found(name, None)} ({self._nothing_loaded()})")
        canary_share = self.live.canary_traffic_percent
        if canary_share > 0 and labels.get("canary") in loaded and self._rng.random() * 100 < canary_share:
            return self._routed(labels["canary"], "canary"), False
        if labels.get("stable") in loaded:
            return self._routed(labels["stable"], "stable"), False
        return self._routed(loaded[-1], "latest"), False

    def _routed(self, version: int, route: str) -> int:
        if self._metrics is not None:
            self._metrics.routed(version, route)
        return version

    def _nothing_loaded(self) -> str:
        if any(state.error for state in self.backend.version_states().values()):
            return "no version could be loaded; the model status says why"
        return "no version is loaded yet; waiting for the first one to be published"

    def status(self, model_name: str, version: int | None) -> dict[int, VersionState]:
        """TF Serving's GetModelStatus: one version's state, or every version's, newest first.

        Labels are ignored, as TF Serving does. NOT_FOUND with its texts when nothing matches.
        """
        states = self.backend.version_states() if model_name == self.config.model_name else {}
        if version is not None:
            if version not in states:
                raise NotFoundError(f"Could not find version {version} of model {model_name}")
            return {version: states[version]}
        if not states:
            raise NotFoundError(f"Could not find any versions of model {model_name}")
        return dict(sorted(states.items(), reverse=True))

    def signatures(self, version: int) -> dict[str, SignatureSpec]:
        """The model's signatures plus the app's image-bytes signature."""
        specs = dict(self.backend.signatures(version))
        if SERVING_DEFAULT in specs:
            specs[IMAGE_BYTES_SIGNATURE] = IMAGE_BYTES_SPEC
        return specs

    def resolve(
        self, model_name: str, version: int | None = None, label: str | None = None, signature_name: str = ""
    ) -> Target:
        """Which version and signature answer: TF Serving's NOT_FOUND / INVALID_ARGUMENT /
        FAILED_PRECONDITION answers, before any input is read."""
        self.check_model(model_name, version)
        resolved, pinned = self.resolve_version(version, label)
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
        """TF Serving's checks on what a request declares, then the limits, before decoding anything.

        ``declared`` maps each input alias to its ``(DataType, shape)``. Besides the signature
        (names, dtypes, shapes, output filter) it enforces at most ``max_images_per_request``
        examples, and that no input decodes to more than ``max_request_bytes`` (a one-value
        fill or a huge declared shape): RESOURCE_EXHAUSTED.
        """
        spec, signature = target.spec, target.signature_name
        spec.check_input_names(list(declared))
        for alias in sorted(declared):
            tf_dtype, shape = declared[alias]
            spec.check_input(signature, alias, tf_dtype, shape)
            self._check_size(alias, spec.inputs[alias].dtype, shape)
        spec.batch_size(signature, {alias: shape for alias, (_, shape) in declared.items()})
        spec.check_output_filter(output_filter)

    def _check_size(self, alias: str, dtype: np.dtype | None, shape: Sequence[int]) -> None:
        limits = self.config.limits
        if shape and shape[0] > limits.max_images_per_request:
            raise ResourceExhaustedError(
                f"{shape[0]} images in one request; the limit is {limits.max_images_per_request}",
                "max_images_per_request",
            )
        if dtype is not None and dtype != STRING:
            need = element_count(shape) * dtype.itemsize
            if need > limits.max_request_bytes:
                raise ResourceExhaustedError(
                    f"input {alias!r} of shape {list(shape)} would take {need} bytes to decode; "
                    f"the limit is max_request_bytes ({limits.max_request_bytes})",
                    "max_request_bytes",
                )

    def max_elements(self, dtype: np.dtype) -> int:
        """The most elements one decoded input of ``dtype`` may have (see :meth:`check_declared`)."""
        if dtype == STRING:
            return self.config.limits.max_images_per_request
        return self.config.limits.max_request_bytes // np.dtype(dtype).itemsize

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
                self._check_size(alias, array.dtype, array.shape)
            target.spec.check_output_filter(output_filter)
        run_signature, run_inputs = target.signature_name, dict(inputs)
        if run_signature == IMAGE_BYTES_SIGNATURE:
            run_signature = SERVING_DEFAULT
            run_inputs = {IMAGES_INPUT: await self._decode_images(inputs[IMAGE_BYTES_INPUT])}
        item = _Item(
            target.version, target.pinned, run_signature, run_inputs, tuple(output_filter), size,
            deadline_s=deadline_s,
        )  # fmt: skip
        # Waiting for a batch gains nothing when the request fills one by itself, or when nothing
        # else is in flight (the backend is idle: a lone request runs at once, no batch wait);
        # while requests are in flight, new ones gather into batches.
        alone = self._in_flight == 0
        self._in_flight += 1
        try:
            if size >= self.live.max_batch_size or size == 0 or alone:
                result = (await self._run_group([item]))[0]
            else:
                result = await self._batched(item)
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        if self._metrics is not None:
            self._metrics.answered(item.version, target.signature_name, size)
        return InferenceResult(target.model_name, item.version, target.signature_name, result)

    async def _decode_images(self, encoded: np.ndarray) -> np.ndarray:
        """Decode and preprocess encoded images on the decoder threads, within the pixel budgets."""
        limits = self.config.limits
        items = [bytes(data) for data in encoded.reshape(-1)]
        if not items:
            return np.zeros((0, MNIST_SIZE_PX, MNIST_SIZE_PX), dtype=np.uint8)
        pixels = 0
        for index, data in enumerate(items):  # headers only: nothing is decompressed yet
            try:
                pixels += image_decoding.declared_pixels(data, max_bytes=limits.max_image_bytes)
            except ServingError as exc:
                raise _for_image(exc, index) from exc
        if pixels > limits.max_request_pixels:
            raise ResourceExhaustedError(
                f"the images hold {pixels} pixels in all; the limit per request is {limits.max_request_pixels}",
                "max_request_pixels",
            )
        if self._pending_decodes >= limits.max_pending_decodes:
            raise ResourceExhaustedError(
                f"{self._pending_decodes} image-bytes requests are already being decoded; retry later",
                "max_pending_decodes",
            )

        def decode_all() -> np.ndarray:
            images = []
            for index, data in enumerate(items):
                try:
                    images.append(
                        preprocessing.preprocess_bytes(
                            data, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
                        )
                    )
                except ServingError as exc:
                    raise _for_image(exc, index) from exc
            return np.stack(images)

        self._pending_decodes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoder, decode_all)
        finally:
            self._pending_decodes -= 1

    async def _batched(self, item: _Item) -> dict[str, np.ndarray] | Exception:
        """``_run_batch(item)``; alone when the batch size was lowered below the item's size while it
        was queued (Serve then fails it with a RuntimeError, which would reach the client as INTERNAL)."""
        try:
            return await self._run_batch(item)
        except RuntimeError as exc:
            if item.size > self.live.max_batch_size and "greater than max_batch_size" in str(exc):
                return (await self._run_group([item]))[0]
            raise

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_batch_images)
    async def _run_batch(self, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        self._follow_latest(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.group_key()].append(index)
        if len(groups) == 1:  # the usual case: no gather, no extra tasks
            return await self._run_group(items)
        results: list[dict[str, np.ndarray] | Exception] = [{} for _ in items]
        group_items = [[items[i] for i in indices] for indices in groups.values()]
        outcomes = await asyncio.gather(*(self._run_group(g) for g in group_items))
        for indices, outcome in zip(groups.values(), outcomes):
            for index, value in zip(indices, outcome):
                results[index] = value
        return results

    def _follow_latest(self, items: list[_Item]) -> None:
        """Unpinned items whose version was unloaded while they waited go to the latest instead."""
        loaded = self.backend.versions()
        for item in items:
            if item.version not in loaded and not item.pinned and loaded:
                item.version = loaded[-1]

    async def _without_expired(
        self, items: list[_Item], expired: list[int]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """DEADLINE_EXCEEDED for the expired items (counted); the others run without them."""
        if self._metrics is not None:
            self._metrics.expired(len(expired))
        error = DeadlineExceededError("the request's deadline passed before the model ran")
        results: list[dict[str, np.ndarray] | Exception] = [error for _ in items]
        live = [i for i in range(len(items)) if i not in set(expired)]
        if live:
            for index, value in zip(live, await self._run_group([items[i] for i in live])):
                results[index] = value
        return results

    async def _run_group(self, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        """One backend call for items sharing version, signature and inputs; split the outputs."""
        self._follow_latest(items)
        first = items[0]
        if any(item.version != first.version for item in items):
            # A version was unloaded after _run_batch grouped these: some unpinned items moved to
            # the latest, pinned ones stay (and get NOT_FOUND). Never answer one with another's.
            same = [i for i, item in enumerate(items) if item.version == first.version]
            other = [i for i, item in enumerate(items) if item.version != first.version]
            parts = await asyncio.gather(
                self._run_group([items[i] for i in same]), self._run_group([items[i] for i in other])
            )
            results: list[dict[str, np.ndarray] | Exception] = [{} for _ in items]
            for indices, outcome in zip((same, other), parts):
                for index, value in zip(indices, outcome):
                    results[index] = value
            return results
        if first.version not in self.backend.versions():
            error = NotFoundError(f"version {first.version} was unloaded before the request ran")
            return [error for _ in items]
        now_s = time.monotonic()
        expired = [
            i for i, item in enumerate(items) if item.deadline_s is not None and item.deadline_s <= now_s
        ]
        if expired:
            return await self._without_expired(items, expired)
        deadlines = [item.deadline_s for item in items]
        timeout_s = self.config.backend_timeout_s
        if None not in deadlines:  # the longest-waiting caller still gets its answer
            timeout_s = min(timeout_s, max(deadlines) - now_s)  # type: ignore[type-var]
        total = sum(item.size for item in items)
        started_s = time.monotonic()
        try:
            inputs = {
                name: np.concatenate([item.inputs[name] for item in items])
                if len(items) > 1
                else first.inputs[name]
                for name in first.inputs
            }
            outputs = await self.backend.predict(
                first.version, first.signature, inputs, first.output_filter, timeout_s=timeout_s
            )
        except Exception as exc:  # every caller of this group gets the same error
            return [exc for _ in items]
        if self._metrics is not None:
            latency_ms = (time.monotonic() - started_s) * 1000
            self._metrics.backend_call(first.version, first.signature, self.backend.kind, total, latency_ms)
            self._metrics.batch_wait((started_s - min(item.queued_s for item in items)) * 1000)
        bounds = np.cumsum([item.size for item in items])[:-1]
        split = {
            name: np.split(value, bounds) if value.ndim and value.shape[0] == total else [value] * len(items)
            for name, value in outputs.items()
        }
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(items))]
