"""A small, real :class:`ray_app.backends.base.Backend` for tests of the request path without TensorFlow.

It serves fixed versions with the SignatureDefs a published SavedModel of ours has (read once from
a real export when given, else built to match) and answers each image with a deterministic
"prediction": the class is the image's pixel sum modulo 10. Enough to exercise parsing, checks,
batching and encoding; the model itself is tested elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import numpy as np

from ray_app.backends.base import AVAILABLE, VersionState
from ray_app.protocol.names import CLASSES_OUTPUT, IMAGES_INPUT, PROBABILITIES_OUTPUT, SCORES_OUTPUT
from ray_app.signatures import SignatureSpec, TensorSpec

SPECS: dict[str, SignatureSpec] = {
    "serving_default": SignatureSpec(
        inputs={IMAGES_INPUT: TensorSpec.of(np.uint8, (None, 28, 28), "serving_default_images:0")},
        outputs={
            PROBABILITIES_OUTPUT: TensorSpec.of(np.float32, (None, 10), "StatefulPartitionedCall:1"),
            CLASSES_OUTPUT: TensorSpec.of(np.int64, (None,), "StatefulPartitionedCall:0"),
        },
    ),
    "predict_images": SignatureSpec(
        inputs={IMAGES_INPUT: TensorSpec.of(np.float32, (None, 784), "predict_images_images:0")},
        outputs={SCORES_OUTPUT: TensorSpec.of(np.float32, (None, 10), "StatefulPartitionedCall_1:0")},
    ),
}


def fake_probabilities(images: np.ndarray) -> np.ndarray:
    sums = images.reshape(len(images), -1).astype(np.int64).sum(axis=1) if images.size else np.zeros(0, int)
    probabilities = np.full((len(images), 10), 0.01, dtype=np.float32)
    probabilities[np.arange(len(images)), sums % 10] = 0.91
    return probabilities


class StaticBackend:
    kind = "static"

    def __init__(
        self, versions: Iterable[int] = (1,), states: Mapping[int, VersionState] | None = None
    ) -> None:
        self._versions = sorted(versions)
        self._states = {**{v: AVAILABLE for v in self._versions}, **(states or {})}
        self.calls: list[tuple[int, str, int]] = []  # (version, signature, batch size)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def versions(self) -> list[int]:
        return list(self._versions)

    def version_states(self) -> dict[int, VersionState]:
        return dict(self._states)

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return SPECS

    def set_pinned_versions(self, versions: Iterable[int]) -> None: ...

    async def predict(
        self,
        version: int,
        signature: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        images = inputs[IMAGES_INPUT]
        self.calls.append((version, signature, len(images)))
        await asyncio.sleep(0.001)  # like a real backend, it yields while the model runs
        probabilities = fake_probabilities(images)
        if signature == "predict_images":
            outputs = {SCORES_OUTPUT: probabilities}
        else:
            outputs = {PROBABILITIES_OUTPUT: probabilities, CLASSES_OUTPUT: probabilities.argmax(axis=1)}
        wanted = set(output_filter) or set(outputs)
        return {k: v for k, v in outputs.items() if k in wanted}

    def health_problem(self) -> str | None:
        return None
