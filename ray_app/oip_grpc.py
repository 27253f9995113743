"""``inference.GRPCInferenceService`` (KServe v2 / Triton gRPC) messages <-> :mod:`ray_app.oip_api`.

The messages are tritonclient's generated ones (``tritonclient.grpc.service_pb2``), imported in
the replica only: the proxy forwards raw bytes (``ray_app.grpc_servicers``). Thin by design: parse
under ``max_request_bytes``, convert, call ``oip_api``, convert back. ``ModelInfer`` accepts
``raw_input_contents`` (one per input, in input order, BYTES length-prefixed) or typed
``contents``, and answers in the same form as the request (raw for a raw request, as Triton
always does and as tritonclient reads; typed contents otherwise, as KServe's ``InferRequest``
``_use_raw_outputs`` does).
"""

from __future__ import annotations

from ray_app import oip_api
from ray_app.grpc_api import parse
from ray_app.predictor import Predictor
from ray_app.protocol import oip_tensors
from ray_app.protocol.status import InvalidArgumentError


def messages():
    """tritonclient's generated ``grpc_service.proto`` module (imported on first use)."""
    from tritonclient.grpc import service_pb2

    return service_pb2


def _parse(predictor: Predictor, name: str, raw: bytes):
    return parse(getattr(messages(), name), raw, predictor.config.limits.max_request_bytes)


def server_live(predictor: Predictor, raw: bytes):
    _parse(predictor, "ServerLiveRequest", raw)
    return messages().ServerLiveResponse(live=True)


def server_ready(predictor: Predictor, raw: bytes):
    _parse(predictor, "ServerReadyRequest", raw)
    return messages().ServerReadyResponse(ready=oip_api.server_ready(predictor))


def model_ready(predictor: Predictor, raw: bytes):
    request = _parse(predictor, "ModelReadyRequest", raw)
    return messages().ModelReadyResponse(ready=oip_api.model_ready(predictor, request.name, request.version))


def server_metadata(predictor: Predictor, raw: bytes):
    _parse(predictor, "ServerMetadataRequest", raw)
    return messages().ServerMetadataResponse(
        name=oip_api.SERVER_NAME, version=oip_api.server_version(), extensions=list(oip_api.EXTENSIONS)
    )


def model_metadata(predictor: Predictor, raw: bytes):
    request = _parse(predictor, "ModelMetadataRequest", raw)
    described = oip_api.model_metadata(predictor, request.name, request.version)
    response = messages().ModelMetadataResponse(
        name=described.name, versions=list(described.versions), platform=described.platform
    )
    for field, tensors in (("inputs", described.inputs), ("outputs", described.outputs)):
        for tensor in tensors:
            getattr(response, field).add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
    return response


async def model_infer(predictor: Predictor, raw: bytes, deadline_s: float | None = None):
    """``ModelInfer``; ``deadline_s``: the call's (``ray_app.deadlines``), into the batch."""
    request = _parse(predictor, "ModelInferRequest", raw)
    target = oip_api.resolve(predictor, request.model_name, request.model_version)
    declared = [
        oip_api.DeclaredInput(item.name, item.datatype, oip_tensors.check_shape(item.name, list(item.shape)))
        for item in request.inputs
    ]
    requested = [output.name for output in request.outputs]
    oip_api.check_declared(predictor.config.limits, target, request.model_name, declared, requested)
    use_raw = len(request.raw_input_contents) > 0
    if use_raw and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgumentError(  # Triton's text (src/grpc/infer_handler.cc)
            f"expected {len(request.inputs)} raw input contents, got {len(request.raw_input_contents)}"
        )
    arrays = {}
    for index, (item, tensor) in enumerate(zip(declared, request.inputs)):
        if use_raw:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"contents field must not be specified when using raw_input_contents for '{item.name}' "
                    f"for model '{request.model_name}'"
                )
            data = request.raw_input_contents[index]
            arrays[item.name] = oip_tensors.from_raw(item.name, item.datatype, item.shape, data)
        else:
            arrays[item.name] = oip_tensors.from_contents(
                item.name, item.datatype, item.shape, tensor.contents
            )
    result = await oip_api.infer(predictor, target, arrays, requested, deadline_s)
    response = messages().ModelInferResponse(
        model_name=request.model_name, model_version=str(result.version), id=request.id
    )
    outputs = oip_api.ordered_outputs(result, requested)
    datatypes = [oip_tensors.datatype_of(value.dtype) for _, value in outputs]
    # raw_output_contents, when used, holds every output (clients index it by output position)
    raw_out = use_raw or any(datatype not in oip_tensors.CONTENTS_FIELDS for datatype in datatypes)
    for (name, value), datatype in zip(outputs, datatypes):
        output = response.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
        if raw_out:
            response.raw_output_contents.append(oip_tensors.to_raw(value))
        else:
            oip_tensors.to_contents(value, output.contents)
    return response


def empty_response(method: str):
    """The empty answer of ``method`` (sent with an error status)."""
    return getattr(messages(), f"{method}Response")()
