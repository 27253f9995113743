"""Model logic behind both front doors: version routing, input checks, batching, backend calls.

Transport-free: the gRPC and REST adapters turn their messages into an ``InferenceRequest``
and an ``InferenceResult`` back. Batching uses Ray Serve's ``@serve.batch``; a batch is
split by (version, signature, inputs, output filter) so different models never share a
backend call, and it counts images, not requests.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from ray_app import preprocessing
from ray_app.backends.base import Backend
from ray_app.config import AppConfig, LiveConfig
from ray_app.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from ray_app.signatures import (
    IMAGE_BYTES_INPUT,
    IMAGE_BYTES_SIGNATURE,
    IMAGE_BYTES_SPEC,
    SERVING_DEFAULT,
    SignatureSpec,
    lookup,
)


@dataclass(frozen=True)
class InferenceRequest:
    model_name: str
    inputs: dict[str, np.ndarray]
    signature_name: str = ""  # "" means serving_default
    version: int | None = None
    version_label: str | None = None
    output_filter: tuple[str, ...] = ()


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


def _batch_images(items: list[_Item]) -> int:
    return sum(item.size for item in items)


class Predictor:
    """One per replica process: Ray Serve keeps a single batch queue per decorated method."""

    def __init__(self, config: AppConfig, backend: Backend, rng: random.Random | None = None) -> None:
        self.config = config
        self.backend = backend
        self.live = LiveConfig()
        self._rng = rng or random.Random()

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, live: LiveConfig) -> None:
        """Apply new live settings (batch limits, labels, canary share) without a restart."""
        self.live = live
        self._run_batch.set_max_batch_size(live.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.backend.set_pinned_versions(live.version_labels.values())

    # -- versions ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise NotFoundError(f"model {name!r} not found; this server serves {self.config.model_name!r}")

    def resolve_version(self, version: int | None, label: str | None) -> tuple[int, bool]:
        """(version to run, whether the client pinned it), following labels and the canary share."""
        loaded = self.backend.versions()
        if not loaded:
            raise UnavailableError(f"no version of {self.config.model_name!r} is loaded yet")
        if version:
            if version not in loaded:
                raise NotFoundError(
                    f"version {version} of model {self.config.model_name!r} is not loaded; loaded: {loaded}"
                )
            return version, True
        labels = self.live.version_labels
        if label:
            if label not in labels:
                raise NotFoundError(f"unknown version label {label!r}; labels: {sorted(labels)}")
            return self._labelled(label, loaded), True
        canary_share = self.live.canary_traffic_percent
        if canary_share > 0 and labels.get("canary") in loaded and self._rng.random() * 100 < canary_share:
            return labels["canary"], False
        if labels.get("stable") in loaded:
            return labels["stable"], False
        return loaded[-1], False

    def status_versions(self, model_name: str, version: int | None, label: str | None) -> list[int]:
        """Loaded versions a status request asks about (all, one, or a label's), NOT_FOUND otherwise."""
        self.check_model(model_name)
        loaded = self.backend.versions()
        if label:
            version, _ = self.resolve_version(None, label)
        if version is None:
            return loaded
        if version not in loaded:
            raise NotFoundError(f"version {version} of {model_name!r} is not loaded")
        return [version]

    def _labelled(self, label: str, loaded: Sequence[int]) -> int:
        version = self.live.version_labels[label]
        if version not in loaded:
            raise NotFoundError(f"label {label!r} points to version {version}, which is not loaded: {loaded}")
        return version

    def signatures(self, version: int) -> dict[str, SignatureSpec]:
        """The model's signatures plus the app's image-bytes signature."""
        specs = dict(self.backend.signatures(version))
        if SERVING_DEFAULT in specs:
            specs[IMAGE_BYTES_SIGNATURE] = IMAGE_BYTES_SPEC
        return specs

    # -- inference -----------------------------------------------------------------------------
    async def predict(self, request: InferenceRequest) -> InferenceResult:
        self.check_model(request.model_name)
        version, pinned = self.resolve_version(request.version, request.version_label)
        signature = request.signature_name or SERVING_DEFAULT
        spec = lookup(self.signatures(version), signature, self.config.model_name, version)
        size = spec.check_inputs(signature, request.inputs)
        limit = self.config.limits.max_images_per_request
        if size > limit:
            raise ResourceExhaustedError(f"{size} images in one request; the limit is {limit}")
        run_signature, inputs = signature, request.inputs
        if signature == IMAGE_BYTES_SIGNATURE:
            run_signature = SERVING_DEFAULT
            inputs = {"images": await self._decode_images(inputs[IMAGE_BYTES_INPUT])}
        unknown = set(request.output_filter) - set(spec.outputs)
        if unknown:
            raise InvalidArgumentError(f"output_filter names unknown outputs {sorted(unknown)}")
        item = _Item(version, pinned, run_signature, inputs, tuple(request.output_filter), size)
        if size >= self.live.max_batch_size:  # fills a batch by itself: waiting gains nothing
            outputs = await self._run_group([item])
            result = outputs[0]
        else:
            result = await self._run_batch(item)
        if isinstance(result, Exception):
            raise result
        return InferenceResult(self.config.model_name, item.version, signature, result)

    async def _decode_images(self, encoded: np.ndarray) -> np.ndarray:
        limits = self.config.limits

        def decode_all() -> np.ndarray:
            images = []
            for index, data in enumerate(encoded.reshape(-1)):
                try:
                    images.append(
                        preprocessing.preprocess_bytes(
                            bytes(data), max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
                        )
                    )
                except (InvalidArgumentError, ResourceExhaustedError) as exc:
                    raise type(exc)(f"image {index}: {exc.message}") from exc
            return np.stack(images)

        return await asyncio.to_thread(decode_all)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_batch_images)
    async def _run_batch(self, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        loaded = set(self.backend.versions())
        latest = max(loaded) if loaded else None
        for item in items:
            if item.version not in loaded and not item.pinned and latest is not None:
                item.version = latest  # its version was unloaded while it waited
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            key = (item.version, item.signature, tuple(sorted(item.inputs)), item.output_filter)
            groups[key].append(index)
        results: list[dict[str, np.ndarray] | Exception] = [{} for _ in items]
        group_items = [[items[i] for i in indices] for indices in groups.values()]
        outcomes = await asyncio.gather(*(self._run_group(g) for g in group_items))
        for indices, outcome in zip(groups.values(), outcomes):
            for index, value in zip(indices, outcome):
                results[index] = value
        return results

    async def _run_group(self, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        """One backend call for items sharing version, signature and inputs; split the outputs."""
        first = items[0]
        if first.version not in self.backend.versions():
            error = NotFoundError(f"version {first.version} was unloaded before the request ran")
            return [error for _ in items]
        inputs = {
            name: np.concatenate([item.inputs[name] for item in items])
            if len(items) > 1
            else first.inputs[name]
            for name in first.inputs
        }
        try:
            outputs = await self.backend.predict(first.version, first.signature, inputs, first.output_filter)
        except Exception as exc:  # every caller of this group gets the same error
            return [exc for _ in items]
        total = sum(item.size for item in items)
        bounds = np.cumsum([item.size for item in items])[:-1]
        split = {
            name: np.split(value, bounds) if value.ndim and value.shape[0] == total else [value] * len(items)
            for name, value in outputs.items()
        }
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(items))]
