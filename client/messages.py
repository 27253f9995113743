"""TF Serving ``Predict`` messages for the MNIST model: build requests, read responses.

Transport-free: the same request content goes out as a ``PredictRequest`` protobuf (gRPC) or as
TF Serving's REST JSON, and both kinds of answer come back as one :class:`Predictions`.
Two input modes match the app's signatures (``ray_app.signatures``):

- tensor mode: ``serving_default`` with ``images`` uint8 ``[N, 28, 28]``, preprocessed on the
  client with the server's own code (``ray_app.preprocessing``);
- bytes mode: ``predict_image_bytes`` with the encoded files as ``image_bytes`` string ``[N]``;
  the server decodes and preprocesses them.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.errors import ClientError
from ray_app.protocol.names import (
    CLASSES_OUTPUT,
    IMAGE_BYTES_INPUT,
    IMAGE_BYTES_SIGNATURE,
    IMAGES_INPUT,
    NUM_CLASSES,
    PROBABILITIES_OUTPUT,
    SERVING_DEFAULT,
)
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.status import ServingError
from ray_app.protocol.tensors import from_ndarray, to_ndarray

# A response tensor declaring more elements than this is refused before it is decoded (4 MiB of
# float32: far more than any batch the client sends can be answered with).
MAX_RESPONSE_ELEMENTS = 1 << 20


class InputMode(enum.Enum):
    TENSOR = "tensor"  # client-side preprocessing, serving_default
    BYTES = "bytes"  # encoded images, predict_image_bytes

    @property
    def signature(self) -> str:
        return SERVING_DEFAULT if self is InputMode.TENSOR else IMAGE_BYTES_SIGNATURE

    @property
    def input_name(self) -> str:
        return IMAGES_INPUT if self is InputMode.TENSOR else IMAGE_BYTES_INPUT


@dataclass(frozen=True)
class ModelTarget:
    """Which model answers: the latest version, a pinned ``version`` or a ``version_label``."""

    name: str
    version: int | None = None
    version_label: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name must not be empty")
        if self.version is not None and self.version_label is not None:
            raise ValueError("give a version or a version label, not both")
        if self.version is not None and self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")


@dataclass(frozen=True)
class Batch:
    """The inputs of one request: a uint8 ``[N, 28, 28]`` array (tensor mode) or encoded images."""

    mode: InputMode
    images: np.ndarray | None = None
    encoded: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.mode is InputMode.TENSOR:
            if self.images is None or self.images.dtype != np.uint8 or self.images.shape[1:] != (28, 28):
                raise ValueError("tensor mode needs uint8 images of shape [N, 28, 28]")
        elif not self.encoded:
            raise ValueError("bytes mode needs at least one encoded image")

    def __len__(self) -> int:
        return len(self.images) if self.mode is InputMode.TENSOR else len(self.encoded)


@dataclass(frozen=True)
class Predictions:
    """Per-image class probabilities, predicted digits, and the model version that answered."""

    probabilities: np.ndarray  # float32 [N, 10]
    classes: np.ndarray  # int64 [N]
    version: int | None  # None when the protocol does not say

    def __len__(self) -> int:
        return len(self.classes)

    def digit(self, index: int) -> int:
        return int(self.classes[index])

    def confidence(self, index: int) -> float:
        """The probability of the predicted digit."""
        return float(self.probabilities[index, self.classes[index]])


# -- gRPC -------------------------------------------------------------------------------------------
def predict_request(target: ModelTarget, batch: Batch) -> predict_pb2.PredictRequest:
    """TF Serving's ``PredictRequest`` for ``batch`` (images in ``tensor_content``, as TF's clients send)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = target.name
    request.model_spec.signature_name = batch.mode.signature
    if target.version is not None:
        request.model_spec.version.value = target.version
    elif target.version_label is not None:
        request.model_spec.version_label = target.version_label
    if batch.mode is InputMode.TENSOR:
        tensor = from_ndarray(np.ascontiguousarray(batch.images), tensor_content=True)
    else:
        tensor = from_ndarray(np.array(batch.encoded, dtype=object))
    request.inputs[batch.mode.input_name].CopyFrom(tensor)
    return request


def parse_predict_response(response: predict_pb2.PredictResponse, expected: int) -> Predictions:
    """Read a ``PredictResponse`` (typed fields or ``tensor_content``); ClientError if it is malformed."""
    try:
        outputs = {
            name: to_ndarray(response.outputs[name], name, max_elements=MAX_RESPONSE_ELEMENTS)
            for name in (PROBABILITIES_OUTPUT, CLASSES_OUTPUT)
            if name in response.outputs
        }
    except ServingError as exc:
        raise ClientError(f"malformed response: {exc.message}") from None
    version = response.model_spec.version.value if response.model_spec.HasField("version") else None
    return _predictions(outputs, expected, version)


# -- REST -------------------------------------------------------------------------------------------
def rest_path(target: ModelTarget) -> str:
    """TF Serving's REST path for ``:predict`` on ``target``."""
    from urllib.parse import quote

    path = f"/v1/models/{quote(target.name, safe='')}"
    if target.version is not None:
        path += f"/versions/{target.version}"
    elif target.version_label is not None:
        path += f"/labels/{quote(target.version_label, safe='')}"
    return path + ":predict"


def rest_body(batch: Batch) -> dict[str, Any]:
    """The JSON body (row format) for ``batch``; binary images go as ``{"b64": ...}``."""
    if batch.mode is InputMode.TENSOR:
        instances: list[Any] = batch.images.tolist()
    else:
        instances = [{"b64": base64.b64encode(data).decode("ascii")} for data in batch.encoded]
    return {"signature_name": batch.mode.signature, "instances": instances}


def parse_rest_response(body: Any, expected: int, version: int | None) -> Predictions:
    """Read a row-format ``{"predictions": [{"probabilities": [...], "classes": d}, ...]}``."""
    rows = body.get("predictions") if isinstance(body, Mapping) else None
    if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
        raise ClientError("malformed response: no 'predictions' list of objects")
    outputs = {}
    for name in (PROBABILITIES_OUTPUT, CLASSES_OUTPUT):
        if all(name in row for row in rows):
            try:
                outputs[name] = np.asarray([row[name] for row in rows], dtype=np.float64)
            except (TypeError, ValueError):
                raise ClientError(f"malformed response: {name!r} is not numeric") from None
    if CLASSES_OUTPUT in outputs:
        outputs[CLASSES_OUTPUT] = outputs[CLASSES_OUTPUT].astype(np.int64)
    return _predictions(outputs, expected, version)


def _predictions(outputs: Mapping[str, np.ndarray], expected: int, version: int | None) -> Predictions:
    missing = [name for name in (PROBABILITIES_OUTPUT, CLASSES_OUTPUT) if name not in outputs]
    if missing:
        raise ClientError(f"malformed response: missing output(s) {', '.join(missing)}")
    probabilities = np.asarray(outputs[PROBABILITIES_OUTPUT], dtype=np.float32)
    classes = np.asarray(outputs[CLASSES_OUTPUT]).astype(np.int64).reshape(-1)
    if probabilities.shape != (expected, NUM_CLASSES) or classes.shape != (expected,):
        raise ClientError(
            f"malformed response: expected {expected} predictions, got probabilities "
            f"{list(probabilities.shape)} and classes {list(classes.shape)}"
        )
    if np.any((classes < 0) | (classes >= NUM_CLASSES)):
        raise ClientError("malformed response: a class is not a digit 0-9")
    return Predictions(probabilities=probabilities, classes=classes, version=version)


def images_batch(images: Sequence[np.ndarray]) -> Batch:
    """A tensor-mode batch from 28x28 uint8 arrays."""
    return Batch(InputMode.TENSOR, images=np.stack([np.asarray(i, dtype=np.uint8) for i in images]))


def bytes_batch(encoded: Sequence[bytes]) -> Batch:
    """A bytes-mode batch from encoded image files."""
    return Batch(InputMode.BYTES, encoded=tuple(encoded))
