"""The Open Inference Protocol (KServe v2, Triton) <-> the predictor: what both OIP transports share.

An OIP *model* is one signature of the served model: ``mnist`` is its ``serving_default``
(uint8 images ``[-1,28,28]``), ``mnist.<signature>`` any other (``mnist.predict_image_bytes``:
encoded images as a BYTES ``[-1]`` input; ``mnist.predict_images``: float32 ``[-1,784]``). A
*version* is a version number, or one of the configured version labels (``stable``, ``canary``);
none means what TF Serving's protocol gets without one (latest, stable, or the canary share).

Requests are converted into what :class:`ray_app.predictor.Predictor` takes: version routing,
limits, batching and the backend are the same objects TF Serving's protocol uses. The declared
inputs (names, datatypes, shapes, BYTES element counts) are checked here with Triton's texts, then
by :meth:`Predictor.check_declared` (signature and limits), before any data is decoded. Texts and
codes follow Triton (``src/http_server.cc``, ``src/grpc/infer_handler.cc``, ``src/common.cc``) and
the KServe spec (``docs/oip.md`` lists each case).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np

from ray_app import declared as declared_checks
from ray_app.config import Limits
from ray_app.predictor import InferenceResult, Predictor, Target
from ray_app.protocol import oip_tensors
from ray_app.protocol.names import SERVING_DEFAULT
from ray_app.protocol.status import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from ray_app.protocol.tensors import STRING, dtype_of_numpy
from ray_app.signatures import SignatureNotFoundError, SignatureSpec

SERVER_NAME = "mnist-ray"
PLATFORM = "tensorflow_savedmodel"  # Triton's platform name for a TF SavedModel
EXTENSIONS = ("binary_tensor_data",)
SIGNATURE_SEPARATOR = "."


@dataclass(frozen=True)
class DeclaredInput:
    """One input as a request declares it, before its data is read."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def server_version() -> str:
    try:
        return package_metadata.version(SERVER_NAME)
    except package_metadata.PackageNotFoundError:
        return "unknown"


# -- names and versions ------------------------------------------------------------------------------
def _unknown_model(name: str) -> NotFoundError:
    """Triton's NOT_FOUND for a model name it does not serve (model_repository_manager.cc)."""
    return NotFoundError(f"Request for unknown model: '{name[:200]}' is not found")


def _unknown_version(name: str, version: str) -> NotFoundError:
    """Triton's NOT_FOUND for a version of a model it does not have (model_lifecycle.cc GetModel)."""
    return NotFoundError(f"'{name[:200]}' version {version[:40]} is not found")


def _no_versions(name: str) -> NotFoundError:
    return NotFoundError(f"'{name[:200]}' has no available versions")


def split_name(predictor: Predictor, name: str) -> str:
    """The signature an OIP model name stands for; NOT_FOUND for a name this server does not serve."""
    base = predictor.config.model_name
    if name == base:
        return SERVING_DEFAULT
    prefix = base + SIGNATURE_SEPARATOR
    signature = name[len(prefix) :] if name.startswith(prefix) else ""
    if not signature or signature.startswith("__"):  # TF's own (__saved_model_init_op) are not models
        raise _unknown_model(name)
    return signature


def parse_version(predictor: Predictor, version: str) -> tuple[int | None, str | None]:
    """(version number, label) of a version string: "" is none, digits a number, else a label."""
    if not version:
        return None, None
    if version.isascii() and version.isdigit():
        if len(version) > 18 or int(version) == 0:
            raise _unknown_version(predictor.config.model_name, version)
        return int(version), None
    if version in predictor.live.version_labels:
        return None, version
    raise InvalidArgumentError(  # Triton's text (src/common.cc GetModelVersionFromString), plus labels
        f"failed to get model version from specified version string '{version[:40]}', version should be "
        f"an integral value > 0 or one of the version labels {sorted(predictor.live.version_labels)}"
    )


def _pinned_version(predictor: Predictor, name: str, version: str) -> int | None:
    """The loaded version a version string names (None: not pinned); NOT_FOUND if it is not loaded."""
    number, label = parse_version(predictor, version)
    if label is not None:
        number = predictor.live.version_labels[label]
    if number is not None and number not in predictor.backend.versions():
        raise _unknown_version(name, version)
    return number


def resolve(predictor: Predictor, name: str, version: str) -> Target:
    """Which version and signature answer an infer request (Triton's codes, the predictor's routing)."""
    signature = split_name(predictor, name)
    number, label = parse_version(predictor, version)
    _pinned_version(predictor, name, version)  # Triton's NOT_FOUND text for a version not loaded
    if not predictor.backend.versions():
        raise _no_versions(name)
    try:
        return predictor.resolve(predictor.config.model_name, number, label, signature)
    except SignatureNotFoundError:
        raise _unknown_model(name) from None


def _signature(predictor: Predictor, name: str, version: str) -> tuple[int, SignatureSpec]:
    signature = split_name(predictor, name)
    number = _pinned_version(predictor, name, version)
    loaded = predictor.backend.versions()
    if number is None:
        if not loaded:
            raise _no_versions(name)
        number = loaded[-1]
    signatures = predictor.signatures(number)
    if signature not in signatures:
        raise _unknown_model(name)
    return number, signatures[signature]


# -- health and metadata -----------------------------------------------------------------------------
def server_ready(predictor: Predictor) -> bool:
    """Ready when a version of the model is loaded (Triton: when every model is ready)."""
    return bool(predictor.backend.versions())


def model_ready(predictor: Predictor, name: str, version: str) -> bool:
    """Whether that model (version) can answer now. As Triton: NOT_FOUND for a model or version it
    does not know; False for a version it knows that is not loaded (loading, or failed to load)."""
    split_name(predictor, name)
    number, label = parse_version(predictor, version)
    if label is not None:
        number = predictor.live.version_labels[label]
    if number is not None and number not in predictor.backend.versions():
        if number in predictor.backend.version_states():
            return False
        raise _unknown_version(name, version)
    _signature(predictor, name, version)
    return True


def _tensor_metadata(specs: Mapping[str, object]) -> tuple[TensorMetadata, ...]:
    described = []
    for name in sorted(specs):
        spec = specs[name]
        shape = (-1,) if spec.shape is None else tuple(-1 if d is None else int(d) for d in spec.shape)
        datatype = oip_tensors.datatype_of(spec.dtype) if spec.dtype is not None else "INVALID"
        described.append(TensorMetadata(name, datatype, shape))
    return tuple(described)


def model_metadata(predictor: Predictor, name: str, version: str) -> ModelMetadata:
    """A signature as an OIP model: its inputs and outputs with OIP datatypes, -1 for any size."""
    _, spec = _signature(predictor, name, version)
    return ModelMetadata(
        name=name,
        versions=tuple(str(v) for v in predictor.backend.versions()),
        platform=PLATFORM,
        inputs=_tensor_metadata(spec.inputs),
        outputs=_tensor_metadata(spec.outputs),
    )


# -- infer -------------------------------------------------------------------------------------------
def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def check_declared(
    limits: Limits, target: Target, name: str, inputs: Sequence[DeclaredInput], outputs: Sequence[str]
) -> None:
    """Triton's checks on the declared inputs and requested outputs, then TF Serving's (signature,
    ``max_images_per_request``, ``max_request_bytes``) and BYTES element counts: before any decode.
    A pure function of the target's signature and the limits (it also runs in a decoding process)."""
    spec = target.spec
    names = [item.name for item in inputs]
    for item in inputs:
        if names.count(item.name) > 1:
            raise InvalidArgumentError(f"input '{item.name}' already exists in request")
        if item.name not in spec.inputs:
            raise InvalidArgumentError(f"unexpected inference input '{item.name}' for model '{name}'")
    missing = sorted(set(spec.inputs) - set(names))
    if missing:
        raise InvalidArgumentError(
            f"expected {len(spec.inputs)} inputs but got {len(inputs)} inputs for model '{name}'. "
            f"Got input(s) {names}, but missing required input(s) {missing}. "
            "Please provide all required input(s)."
        )
    for item in inputs:
        want = spec.inputs[item.name]
        dtype = oip_tensors.numpy_dtype(item.datatype, item.name)
        if want.dtype is None or dtype != want.dtype:
            expected = oip_tensors.datatype_of(want.dtype) if want.dtype is not None else "INVALID"
            raise InvalidArgumentError(
                f"inference input '{item.name}' data-type is '{item.datatype}', but model '{name}' "
                f"expects '{expected}'"
            )
        if want.shape is not None and (
            len(item.shape) != len(want.shape)
            or any(w is not None and w != g for w, g in zip(want.shape, item.shape))
        ):
            raise InvalidArgumentError(
                f"unexpected shape for input '{item.name}' for model '{name}'. Expected "
                f"{_shape_text(want.shape)}, got {_shape_text(item.shape)}"
            )
    for output in outputs:
        if output not in spec.outputs:
            raise InvalidArgumentError(f"unexpected inference output '{output}' for model '{name}'")
    if len(set(outputs)) != len(outputs):
        raise InvalidArgumentError(f"requested outputs of model '{name}' name an output twice")
    declared = {
        item.name: (dtype_of_numpy(oip_tensors.DATATYPES[item.datatype]), item.shape) for item in inputs
    }
    declared_checks.check_declared(target.spec, target.signature_name, declared, list(outputs), limits)
    most = declared_checks.max_elements(STRING, limits)
    for item in inputs:
        if oip_tensors.DATATYPES[item.datatype] == STRING:
            count = oip_tensors.element_count(item.shape)
            if count > most:
                raise ResourceExhaustedError(
                    f"input '{item.name}' holds {count} BYTES elements; the limit is "
                    f"max_images_per_request ({most})",
                    "max_images_per_request",
                )


async def infer(
    predictor: Predictor,
    target: Target,
    arrays: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    deadline_s: float | None = None,
) -> InferenceResult:
    """Run decoded inputs through the shared batcher (already checked by :func:`check_declared`);
    ``deadline_s``: when the caller stops waiting (``Predictor.run``)."""
    return await predictor.run(
        target, dict(arrays), list(outputs), declared_checked=True, deadline_s=deadline_s
    )


def ordered_outputs(result: InferenceResult, requested: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The outputs in the order requested, else by name."""
    names = list(requested) or sorted(result.outputs)
    return [(name, result.outputs[name]) for name in names]
