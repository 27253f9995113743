"""TF Serving's gRPC messages <-> the predictor (replica side of the gRPC front door).

Thin by design: parse and check the request bytes, convert to an ``InferenceRequest``,
call the predictor, convert back. Status codes come from ``ray_app.errors``.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from ray_app.errors import InvalidArgumentError, ResourceExhaustedError
from ray_app.predictor import InferenceRequest, InferenceResult, Predictor
from ray_app.signatures import SignatureSpec, TensorSpec
from ray_app.tensors import dtype_of_numpy, from_ndarray, to_ndarray

_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


def parse(message_type, raw: bytes, max_bytes: int):
    """Decode request bytes into ``message_type``, enforcing the size limit."""
    if len(raw) > max_bytes:
        raise ResourceExhaustedError(f"request is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgumentError(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from exc


def _spec_version(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    version = spec.version.value if spec.HasField("version") else None
    return version, spec.version_label or None


def to_inference_request(request: predict_pb2.PredictRequest) -> InferenceRequest:
    if not request.model_spec.name:
        raise InvalidArgumentError("model_spec.name is required")
    version, label = _spec_version(request.model_spec)
    return InferenceRequest(
        model_name=request.model_spec.name,
        inputs={name: to_ndarray(tensor, name) for name, tensor in request.inputs.items()},
        signature_name=request.model_spec.signature_name,
        version=version,
        version_label=label,
        output_filter=tuple(request.output_filter),
    )


def _model_spec(name: str, version: int, signature: str = "") -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(name=name, version={"value": version}, signature_name=signature)


def to_predict_response(result: InferenceResult) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse(
        model_spec=_model_spec(result.model_name, result.version, result.signature_name)
    )
    for name, value in result.outputs.items():
        response.outputs[name].CopyFrom(from_ndarray(value))
    return response


async def predict(predictor: Predictor, raw: bytes) -> predict_pb2.PredictResponse:
    request = parse(predict_pb2.PredictRequest, raw, predictor.config.limits.max_request_bytes)
    result = await predictor.predict(to_inference_request(request))
    return to_predict_response(result)


def _tensor_info(name: str, spec: TensorSpec) -> meta_graph_pb2.TensorInfo:
    shape = tensor_shape_pb2.TensorShapeProto(unknown_rank=spec.shape is None)
    for dim in spec.shape or ():
        shape.dim.add(size=-1 if dim is None else dim)
    return meta_graph_pb2.TensorInfo(name=name, dtype=dtype_of_numpy(spec.dtype), tensor_shape=shape)


def signature_def(spec: SignatureSpec) -> meta_graph_pb2.SignatureDef:
    """A TF ``SignatureDef`` describing ``spec`` (what TF Serving's metadata returns)."""
    sig = meta_graph_pb2.SignatureDef(method_name=spec.method_name)
    for name, tensor in spec.inputs.items():
        sig.inputs[name].CopyFrom(_tensor_info(name, tensor))
    for name, tensor in spec.outputs.items():
        sig.outputs[name].CopyFrom(_tensor_info(name, tensor))
    return sig


def get_model_metadata(predictor: Predictor, raw: bytes) -> get_model_metadata_pb2.GetModelMetadataResponse:
    request = parse(
        get_model_metadata_pb2.GetModelMetadataRequest, raw, predictor.config.limits.max_request_bytes
    )
    predictor.check_model(request.model_spec.name)
    unsupported = [f for f in request.metadata_field if f != "signature_def"]
    if unsupported or not request.metadata_field:
        raise InvalidArgumentError(
            f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}"
        )
    version, pinned = predictor.resolve_version(*_spec_version(request.model_spec))
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, spec in predictor.signatures(version).items():
        signature_map.signature_def[name].CopyFrom(signature_def(spec))
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=_model_spec(predictor.config.model_name, version)
    )
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(predictor: Predictor, raw: bytes) -> get_model_status_pb2.GetModelStatusResponse:
    request = parse(
        get_model_status_pb2.GetModelStatusRequest, raw, predictor.config.limits.max_request_bytes
    )
    versions = predictor.status_versions(request.model_spec.name, *_spec_version(request.model_spec))
    response = get_model_status_pb2.GetModelStatusResponse()
    for v in versions:
        response.model_version_status.add(version=v, state=_AVAILABLE)
    return response
