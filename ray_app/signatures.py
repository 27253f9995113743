"""Signature descriptions, shared by every backend, and the input checks made against them.

The app adds one signature the SavedModel does not have: ``predict_image_bytes`` takes
encoded images (``image_bytes``: DT_STRING ``[N]``, PNG/JPEG/...), decodes and
preprocesses them (``ray_app.preprocessing``) and runs ``serving_default``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ray_app.errors import InvalidArgumentError, NotFoundError

SERVING_DEFAULT = "serving_default"
IMAGE_BYTES_SIGNATURE = "predict_image_bytes"
IMAGE_BYTES_INPUT = "image_bytes"
# REST predict responses name the version that answered in this header (TF Serving's JSON has no
# field for it; gRPC responses carry it in model_spec.version).
MODEL_VERSION_HEADER = "X-Model-Version"


@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype  # object for strings
    shape: tuple[int | None, ...] | None  # None: unknown rank

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        kind = "string" if self.dtype == np.dtype(object) else self.dtype.name
        return f"{kind}[{dims}]"


@dataclass(frozen=True)
class SignatureSpec:
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    method_name: str = "tensorflow/serving/predict"

    def check_inputs(self, name: str, inputs: Mapping[str, np.ndarray]) -> int:
        """Validate ``inputs`` for signature ``name``; returns the batch size (leading dim)."""
        missing = sorted(set(self.inputs) - set(inputs))
        extra = sorted(set(inputs) - set(self.inputs))
        if missing or extra:
            wanted = ", ".join(f"{k}: {v.describe()}" for k, v in self.inputs.items())
            problem = f"missing {missing}" if missing else f"unexpected {extra}"
            raise InvalidArgumentError(f"signature {name!r}: {problem} input(s); it takes {{{wanted}}}")
        batch: int | None = None
        for key, spec in self.inputs.items():
            array = inputs[key]
            _check_dtype(name, key, spec, array)
            if spec.shape is not None:
                if array.ndim != len(spec.shape) or any(
                    want is not None and want != got for want, got in zip(spec.shape, array.shape)
                ):
                    raise InvalidArgumentError(
                        f"signature {name!r}: input {key!r} has shape {list(array.shape)}, "
                        f"expected {spec.describe()}"
                    )
            if array.ndim == 0:
                raise InvalidArgumentError(f"signature {name!r}: input {key!r} must be batched")
            if batch is not None and array.shape[0] != batch:
                raise InvalidArgumentError(f"signature {name!r}: inputs disagree on the batch size")
            batch = int(array.shape[0])
        if not batch:
            raise InvalidArgumentError(f"signature {name!r}: empty batch (0 examples)")
        return batch


def _check_dtype(name: str, key: str, spec: TensorSpec, array: np.ndarray) -> None:
    if array.dtype != spec.dtype:
        raise InvalidArgumentError(
            f"signature {name!r}: input {key!r} has dtype {_kind(array.dtype)}, expected {_kind(spec.dtype)}"
        )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InvalidArgumentError(f"signature {name!r}: input {key!r} contains NaN or infinity")


def _kind(dtype: np.dtype) -> str:
    return "string" if dtype == np.dtype(object) else dtype.name


IMAGE_BYTES_SPEC = SignatureSpec(
    inputs={IMAGE_BYTES_INPUT: TensorSpec(np.dtype(object), (None,))},
    outputs={
        "probabilities": TensorSpec(np.dtype(np.float32), (None, 10)),
        "classes": TensorSpec(np.dtype(np.int64), (None,)),
    },
)


def lookup(signatures: Mapping[str, SignatureSpec], name: str, model: str, version: int) -> SignatureSpec:
    """The named signature, or NOT_FOUND naming the ones that exist."""
    if name in signatures:
        return signatures[name]
    raise NotFoundError(
        f"signature {name!r} not found in model {model!r} version {version}; available: {sorted(signatures)}"
    )
