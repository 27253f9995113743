"""Signatures as TF Serving sees them (``SignatureDef``), and the input checks it makes against them.

A :class:`SignatureSpec` wraps the model's own ``SignatureDef`` (tensor names, dtypes, shapes,
method), so metadata answers repeat it exactly and checks can quote it. The app adds one
signature the SavedModel does not have: ``predict_image_bytes`` takes encoded images
(``image_bytes``: DT_STRING ``[N]``, PNG/JPEG/...), decodes and preprocesses them
(``ray_app.preprocessing``) and runs ``serving_default``.

The checks follow TF Serving's order and texts (``servables/tensorflow/predict_util.cc``,
``tensorflow/cc/saved_model/util.cc``, ``function.cc``): input count, input names, each
input's dtype (TF's own "Expects arg[i] to be ... but ... is provided"), then the output
filter. They run on what a request *declares* (names, dtypes, shapes), before any value is
decoded. Shapes are checked too (TF Serving leaves that to the graph, whose errors cannot be
reproduced; ours name the input and the expected shape, with the same code).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ray_app.protocol.names import CLASSES_OUTPUT, IMAGE_BYTES_INPUT, NUM_CLASSES, PROBABILITIES_OUTPUT
from ray_app.protocol.protos import meta_graph_pb2, tensor_shape_pb2, types_pb2
from ray_app.protocol.status import FailedPreconditionError, InvalidArgumentError
from ray_app.protocol.tensors import STRING, dtype_of_numpy, numpy_dtype_or_none, tf_dtype_string

PREDICT_METHOD = "tensorflow/serving/predict"


@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype | None  # object for strings; None for a dtype this server cannot hold
    shape: tuple[int | None, ...] | None  # None: unknown rank
    name: str = ""  # the graph tensor (TF Serving's "feed name"), e.g. serving_default_images:0
    tf_dtype: int = types_pb2.DT_INVALID

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{tf_dtype_string(self.tf_dtype)}[{dims}]"

    def example_elements(self) -> int | None:
        """Elements per example (the known dimensions after the batch one), None if any is unknown."""
        if self.shape is None or any(d is None for d in self.shape[1:]):
            return None
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @classmethod
    def from_tensor_info(cls, info: meta_graph_pb2.TensorInfo) -> TensorSpec:
        shape = None
        if not info.tensor_shape.unknown_rank:
            shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
        return cls(numpy_dtype_or_none(info.dtype), shape, info.name, info.dtype)

    @classmethod
    def of(cls, dtype: np.dtype, shape: tuple[int | None, ...] | None, name: str = "") -> TensorSpec:
        """A spec from a numpy dtype (what in-process backends describe)."""
        return cls(np.dtype(dtype), shape, name, dtype_of_numpy(dtype))

    def tensor_info(self) -> meta_graph_pb2.TensorInfo:
        shape = tensor_shape_pb2.TensorShapeProto(unknown_rank=self.shape is None)
        for dim in self.shape or ():
            shape.dim.add(size=-1 if dim is None else dim)
        return meta_graph_pb2.TensorInfo(name=self.name, dtype=self.tf_dtype, tensor_shape=shape)


class SignatureNotFoundError(FailedPreconditionError):
    """TF Serving's Predict answer for an unknown signature key (REST reports it differently)."""

    def __init__(self, signature: str) -> None:
        super().__init__(f'Serving signature key "{signature}" not found.')
        self.signature = signature


@dataclass(frozen=True)
class SignatureSpec:
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    method_name: str = PREDICT_METHOD
    signature_def: meta_graph_pb2.SignatureDef | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_signature_def(cls, signature_def: meta_graph_pb2.SignatureDef) -> SignatureSpec:
        return cls(
            inputs={k: TensorSpec.from_tensor_info(v) for k, v in signature_def.inputs.items()},
            outputs={k: TensorSpec.from_tensor_info(v) for k, v in signature_def.outputs.items()},
            method_name=signature_def.method_name,
            signature_def=signature_def,
        )

    def for_decoding(self) -> SignatureSpec:
        """The spec without the model's SignatureDef: what decoding a request needs, and cheap to
        send to another process (unpickling the SignatureDef there would import TensorFlow)."""
        return replace(self, signature_def=None)

    def to_signature_def(self) -> meta_graph_pb2.SignatureDef:
        """The SignatureDef metadata answers show: the model's own when known."""
        if self.signature_def is not None:
            return self.signature_def
        signature = meta_graph_pb2.SignatureDef(method_name=self.method_name)
        for name, spec in self.inputs.items():
            signature.inputs[name].CopyFrom(spec.tensor_info())
        for name, spec in self.outputs.items():
            signature.outputs[name].CopyFrom(spec.tensor_info())
        return signature

    # -- checks on what a request declares -------------------------------------------------------
    def check_input_names(self, given: Collection[str]) -> None:
        """TF Serving's input count and input name checks (INVALID_ARGUMENT, its texts)."""
        requested, expected = sorted(given), sorted(self.inputs)
        if len(requested) != len(expected):  # no SignatureDef defaults here, so fewer is wrong too
            extra = sorted(set(requested) - set(expected))
            missing = sorted(set(expected) - set(requested))
            raise InvalidArgumentError(
                f"input size does not match signature: {len(requested)}!={len(expected)} "
                f"len({{{','.join(requested)}}}) != len({{{','.join(expected)}}}). "
                f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
            )
        for alias in expected:
            if alias not in given:
                raise InvalidArgumentError(
                    f"Signature input alias: {alias}(feed name: {self.inputs[alias].name}) not found in "
                    f"request and no default value provided. Inputs expected to be in the request "
                    f"{{{','.join(requested)}}}, or default input alias set: "
                )

    def check_input(self, signature: str, alias: str, tf_dtype: int, shape: Sequence[int]) -> None:
        """One input's declared dtype (TF's runtime text) and shape, by its alias."""
        spec = self.inputs[alias]
        if tf_dtype != spec.tf_dtype:
            position = sorted(self.inputs).index(alias)
            raise InvalidArgumentError(
                f"Expects arg[{position}] to be {tf_dtype_string(spec.tf_dtype)} but "
                f"{tf_dtype_string(tf_dtype)} is provided"
            )
        if spec.shape is not None and (
            len(shape) != len(spec.shape)
            or any(want is not None and want != got for want, got in zip(spec.shape, shape))
        ):
            raise InvalidArgumentError(
                f"signature {signature!r}: input {alias!r} has shape {list(shape)}, expected {spec.describe()}"
            )

    def check_output_filter(self, output_filter: Sequence[str]) -> None:
        """TF Serving's ``output_filter`` checks: known aliases, none twice."""
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in self.outputs:
                raise InvalidArgumentError(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                    f"set {{{','.join(sorted(self.outputs))}}}."
                )
            if alias in seen:
                raise InvalidArgumentError(f"duplicate output tensor alias: {alias}")
            seen.add(alias)

    # -- checks on decoded arrays ----------------------------------------------------------------
    def batch_size(self, signature: str, shapes: Mapping[str, Sequence[int]]) -> int:
        """The batch size the inputs' shapes agree on (their leading dimension, may be 0)."""
        batch: int | None = None
        for alias in sorted(shapes):
            shape = shapes[alias]
            if len(shape) == 0:
                raise InvalidArgumentError(f"signature {signature!r}: input {alias!r} must be batched")
            if batch is not None and shape[0] != batch:
                raise InvalidArgumentError(f"signature {signature!r}: inputs disagree on the batch size")
            batch = int(shape[0])
        return batch or 0

    def check_inputs(self, signature: str, inputs: Mapping[str, np.ndarray]) -> int:
        """Validate decoded ``inputs``; returns the batch size (the leading dimension, may be 0)."""
        self.check_input_names(list(inputs))
        for alias in sorted(self.inputs):
            array = inputs[alias]
            self.check_input(signature, alias, dtype_of_numpy(array.dtype), array.shape)
        return self.batch_size(signature, {alias: array.shape for alias, array in inputs.items()})


IMAGE_BYTES_SPEC = SignatureSpec(
    inputs={IMAGE_BYTES_INPUT: TensorSpec.of(STRING, (None,), IMAGE_BYTES_INPUT)},
    outputs={
        PROBABILITIES_OUTPUT: TensorSpec.of(np.dtype(np.float32), (None, NUM_CLASSES), PROBABILITIES_OUTPUT),
        CLASSES_OUTPUT: TensorSpec.of(np.dtype(np.int64), (None,), CLASSES_OUTPUT),
    },
)


def lookup(signatures: Mapping[str, SignatureSpec], name: str) -> SignatureSpec:
    """The named signature, or TF Serving's FAILED_PRECONDITION for an unknown key."""
    if name in signatures:
        return signatures[name]
    raise SignatureNotFoundError(name)
