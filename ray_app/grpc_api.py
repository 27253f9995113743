"""TF Serving's gRPC messages <-> the predictor (the replica side of the gRPC front door).

Thin by design: parse the request bytes, check what the request declares against the
signature and the limits before decoding any tensor, call the predictor, build TF Serving's
answer. Behaviour and texts follow TF Serving (``predict_util.cc``, ``get_model_metadata_impl.cc``,
``get_model_status_impl.cc``, ``classifier.cc``, ``regressor.cc``, ``multi_inference.cc``);
``tests/integration/test_conformance.py`` lists each case with its source. Status codes come
from ``ray_app.protocol.status``.
"""

from __future__ import annotations

from typing import NoReturn

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from ray_app.predictor import InferenceResult, Predictor, Target
from ray_app.protocol.names import SERVING_DEFAULT
from ray_app.protocol.protos import (
    classification_pb2,
    error_codes_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
    types_pb2,
)
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError, UnimplementedError
from ray_app.protocol.tensors import declared_shape, from_ndarray, to_ndarray
from ray_app.signatures import SignatureSpec

_STATE = get_model_status_pb2.ModelVersionStatus.State
_DATA_TYPES = frozenset(types_pb2.DataType.values())
_SIGNATURE_DEF = "signature_def"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def parse(message_type, raw: bytes, max_bytes: int):
    """Decode request bytes into ``message_type``, enforcing the size limit first."""
    if len(raw) > max_bytes:
        raise ResourceExhaustedError(
            f"request is {len(raw)} bytes; the limit is {max_bytes}", "max_request_bytes"
        )
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgumentError(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from exc


def _parse(predictor: Predictor, message_type, raw: bytes):
    request = parse(message_type, raw, predictor.config.limits.max_request_bytes)
    if not request.HasField("model_spec"):
        raise InvalidArgumentError("Missing ModelSpec")
    return request


def _spec_version(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    """The version or label a ModelSpec asks for (a proto oneof: at most one is set)."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _model_spec(name: str, version: int, signature: str | None = None) -> model_pb2.ModelSpec:
    """TF Serving's ``MakeModelSpec``: name, the version that answered, the signature if any."""
    spec = model_pb2.ModelSpec(name=name)
    spec.version.value = version
    if signature is not None:
        spec.signature_name = signature or SERVING_DEFAULT
    return spec


def _resolve(predictor: Predictor, spec: model_pb2.ModelSpec) -> Target:
    return predictor.resolve(spec.name, *_spec_version(spec), signature_name=spec.signature_name)


# -- Predict -----------------------------------------------------------------------------------------
def _declared(request: predict_pb2.PredictRequest) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each input's (DataType, shape) as declared; TF's "tensor parsing error" if it cannot be."""
    declared = {}
    for alias, tensor in request.inputs.items():
        if tensor.dtype == types_pb2.DT_INVALID or tensor.dtype not in _DATA_TYPES:
            raise InvalidArgumentError(f"tensor parsing error: {alias}")
        try:
            declared[alias] = (tensor.dtype, declared_shape(tensor, alias))
        except InvalidArgumentError:
            raise InvalidArgumentError(f"tensor parsing error: {alias}") from None
    return declared


def to_predict_response(result: InferenceResult, model_name: str) -> predict_pb2.PredictResponse:
    """TF Serving's answer: ``model_spec`` echoed with the version that ran, outputs in typed fields."""
    response = predict_pb2.PredictResponse(
        model_spec=_model_spec(model_name, result.version, result.signature_name)
    )
    for name, value in result.outputs.items():
        response.outputs[name].CopyFrom(from_ndarray(value))
    return response


def _decode_inputs(predictor: Predictor, target: Target, request: predict_pb2.PredictRequest):
    """Each input as an array (CPU work on the request's content: may run off the event loop)."""
    return {
        alias: to_ndarray(tensor, alias, max_elements=predictor.max_elements(target.spec.inputs[alias].dtype))
        for alias, tensor in request.inputs.items()
    }


def _output_bytes(result: InferenceResult) -> int:
    return sum(value.nbytes for value in result.outputs.values())


async def predict(
    predictor: Predictor, raw: bytes, deadline_s: float | None = None
) -> predict_pb2.PredictResponse:
    """TF Serving's Predict. Parsing, decoding and encoding of large messages run off the event
    loop (``Predictor.offload``); ``deadline_s``: see ``Predictor.run``."""
    request = await predictor.offload(len(raw), _parse, predictor, predict_pb2.PredictRequest, raw)
    target = _resolve(predictor, request.model_spec)
    target.spec.check_input_names(list(request.inputs))
    predictor.check_declared(target, _declared(request), list(request.output_filter))
    inputs = await predictor.offload(len(raw), _decode_inputs, predictor, target, request)
    output_filter = list(request.output_filter)
    model_name = request.model_spec.name
    del request  # the parsed message can be freed while the model runs
    result = await predictor.run(target, inputs, output_filter, declared_checked=True, deadline_s=deadline_s)
    return await predictor.offload(_output_bytes(result), to_predict_response, result, model_name)


# -- GetModelMetadata --------------------------------------------------------------------------------
def signature_def_map(signatures: dict[str, SignatureSpec]) -> get_model_metadata_pb2.SignatureDefMap:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, spec in signatures.items():
        signature_map.signature_def[name].CopyFrom(spec.to_signature_def())
    return signature_map


def model_metadata(
    predictor: Predictor, spec: model_pb2.ModelSpec, fields: list[str]
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """TF Serving's GetModelMetadata (also behind REST ``/metadata``)."""
    if not fields:
        raise InvalidArgumentError("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != _SIGNATURE_DEF:
            raise InvalidArgumentError(f"Metadata field {field} is not supported")
    version, label = _spec_version(spec)
    predictor.check_model(spec.name, version)
    resolved, _ = predictor.resolve_version(version, label)
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=_model_spec(predictor.config.model_name, resolved)
    )
    response.metadata[_SIGNATURE_DEF].Pack(signature_def_map(predictor.signatures(resolved)))
    return response


def get_model_metadata(predictor: Predictor, raw: bytes) -> get_model_metadata_pb2.GetModelMetadataResponse:
    request = _parse(predictor, get_model_metadata_pb2.GetModelMetadataRequest, raw)
    return model_metadata(predictor, request.model_spec, list(request.metadata_field))


# -- GetModelStatus ----------------------------------------------------------------------------------
def model_status(
    predictor: Predictor, spec: model_pb2.ModelSpec
) -> get_model_status_pb2.GetModelStatusResponse:
    """TF Serving's GetModelStatus: a label is ignored (every version), newest first."""
    version, _ = _spec_version(spec)
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state in predictor.status(spec.name, version).items():
        entry = response.model_version_status.add(version=number, state=_STATE.Value(state.state))
        entry.status.SetInParent()  # TF Serving always sets it: {"error_code": "OK", "error_message": ""}
        entry.status.error_code = _error_code(state.error_code)
        if state.error:
            entry.status.error_message = state.error
    return response


def _error_code(name: str) -> int:
    """``tensorflow.error.Code`` value of a code name (UNKNOWN for names it lacks)."""
    try:
        return error_codes_pb2.Code.Value(name)
    except ValueError:
        return error_codes_pb2.UNKNOWN


def get_model_status(predictor: Predictor, raw: bytes) -> get_model_status_pb2.GetModelStatusResponse:
    request = _parse(predictor, get_model_status_pb2.GetModelStatusRequest, raw)
    return model_status(predictor, request.model_spec)


# -- Classify, Regress, MultiInference ----------------------------------------------------------------
def _debug_string(spec: SignatureSpec) -> str:
    return text_format.MessageToString(spec.to_signature_def())


def check_classification_signature(spec: SignatureSpec) -> None:
    """TF Serving's ``PreProcessClassification`` structure checks (method-name check off, its default)."""
    if len(spec.inputs) != 1:
        raise InvalidArgumentError("Expected one input Tensor.")
    if len(spec.outputs) not in (1, 2):
        raise InvalidArgumentError(f"Expected one or two output Tensors, found {len(spec.outputs)}")
    if "inputs" not in spec.inputs:
        raise InvalidArgumentError(f"No classification inputs found in SignatureDef: {_debug_string(spec)}")
    if "classes" not in spec.outputs and "scores" not in spec.outputs:
        raise InvalidArgumentError(
            'Expected classification signature outputs to contain at least one of "classes" or '
            f'"scores". Signature was: {_debug_string(spec)}'
        )


def check_regression_signature(spec: SignatureSpec) -> None:
    """TF Serving's ``PreProcessRegression`` structure checks."""
    if len(spec.inputs) != 1:
        raise InvalidArgumentError("Expected one input Tensor.")
    if len(spec.outputs) != 1:
        raise InvalidArgumentError("Expected one output Tensor.")
    if "inputs" not in spec.inputs:
        raise InvalidArgumentError(f"No regression inputs found in SignatureDef: {_debug_string(spec)}")
    if "outputs" not in spec.outputs:
        raise InvalidArgumentError(f"No regression outputs found in SignatureDef: {_debug_string(spec)}")


_CHECKS = {CLASSIFY_METHOD: check_classification_signature, REGRESS_METHOD: check_regression_signature}


def check_tf_example_request(predictor: Predictor, spec: model_pb2.ModelSpec, method: str) -> NoReturn:
    """Resolve a Classify/Regress request's signature and run TF Serving's checks on it.

    This server's models take tensors, not serialized ``tf.Example``s: a signature that passes
    every check (none of ours does) is answered UNIMPLEMENTED rather than run.
    """
    version, label = _spec_version(spec)
    predictor.check_model(spec.name, version)
    resolved, _ = predictor.resolve_version(version, label)
    signature = spec.signature_name or SERVING_DEFAULT
    signatures = predictor.signatures(resolved)
    if signature not in signatures:
        raise InvalidArgumentError(f"No signature was found with the name: {signature}")
    _CHECKS[method](signatures[signature])
    raise UnimplementedError(
        f"signature {signature!r} takes tf.Example inputs, which this server does not run"
    )


def classify(predictor: Predictor, raw: bytes) -> NoReturn:
    request = _parse(predictor, classification_pb2.ClassificationRequest, raw)
    check_tf_example_request(predictor, request.model_spec, CLASSIFY_METHOD)


def regress(predictor: Predictor, raw: bytes) -> NoReturn:
    request = _parse(predictor, regression_pb2.RegressionRequest, raw)
    check_tf_example_request(predictor, request.model_spec, REGRESS_METHOD)


def multi_inference(predictor: Predictor, raw: bytes) -> NoReturn:
    """TF Serving's ``TensorFlowMultiInferenceRunner::Infer`` checks, task by task."""
    request = parse(inference_pb2.MultiInferenceRequest, raw, predictor.config.limits.max_request_bytes)
    first = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
    version, label = _spec_version(first)
    predictor.check_model(first.name, version)
    resolved, _ = predictor.resolve_version(version, label)
    signatures = predictor.signatures(resolved)
    seen: set[str] = set()
    for task in request.tasks:
        if not task.model_spec.name:
            raise InvalidArgumentError("Found ModelSpec with an empty model name.")
        if task.model_spec.name != first.name:
            raise InvalidArgumentError(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        signature = task.model_spec.signature_name or SERVING_DEFAULT
        if signature in seen:
            raise InvalidArgumentError(f"Duplicate evaluation of signature: {signature}")
        seen.add(signature)
        if signature not in signatures:
            raise InvalidArgumentError(f"Requested signature not found in model graph: {signature}")
        if task.method_name not in _CHECKS:
            raise UnimplementedError(f"Unsupported signature method_name: {task.method_name}")
        _CHECKS[task.method_name](signatures[signature])
    raise UnimplementedError(
        "MultiInference runs tf.Example signatures, which this server's models do not have"
    )
