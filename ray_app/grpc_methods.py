"""Every gRPC method a replica answers, in one table: its handler, its empty answer, what its
metrics record.

Serve routes a gRPC call to the replica method of the same name; ``ray_app.deployment`` has one
such method per entry, and each looks itself up here. ``ray_app.grpc_servicers`` registers the
same names on Serve's gRPC servers. Handlers are all ``async (predictor, raw bytes, deadline_s)``:
the request's bytes are parsed by the handler, in the replica.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray_app import grpc_api, oip_api, oip_grpc
from ray_app.predictor import Predictor
from ray_app.protocol.protos import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)
from ray_app.protocol.status import UnimplementedError

TF_SERVING = "grpc"  # the `protocol` tag of the request metrics
OIP_GRPC = "oip_grpc"  # the Open Inference Protocol's

Handler = Callable[[Predictor, bytes, float], Awaitable[Any]]
Describe = Callable[[Predictor, Any], tuple[int | None, str]]


@dataclass(frozen=True)
class GrpcMethod:
    protocol: str
    handle: Handler
    empty: Callable[[], Any]  # the answer sent with an error status
    describe: Describe  # (version, signature) of an answer, for the metrics


def _sync(fn: Callable[[Predictor, bytes], Any]) -> Handler:
    """A handler that parses and answers at once (small messages, no model call)."""

    async def handle(predictor: Predictor, raw: bytes, deadline_s: float) -> Any:
        return fn(predictor, raw)

    return handle


async def _predict(predictor: Predictor, raw: bytes, deadline_s: float) -> Any:
    return await grpc_api.predict(predictor, raw, deadline_s=deadline_s)


async def _model_infer(predictor: Predictor, raw: bytes, deadline_s: float) -> Any:
    return await oip_grpc.model_infer(predictor, raw, deadline_s)


def _no_reload(predictor: Predictor, raw: bytes) -> None:
    raise UnimplementedError(
        "HandleReloadConfigRequest is not supported: models are configured by the Serve config "
        "(`serve deploy`), and new versions are picked up from the model store"
    )


def _tf_serving_spec(predictor: Predictor, result: Any) -> tuple[int | None, str]:
    """(version, signature) from a TF Serving answer's ``model_spec`` (None, "" without one)."""
    spec = getattr(result, "model_spec", None)
    version = spec.version.value if spec is not None and spec.HasField("version") else None
    return version, spec.signature_name if spec is not None else ""


def _nothing(predictor: Predictor, result: Any) -> tuple[int | None, str]:
    return None, ""


def _oip_inferred(predictor: Predictor, result: Any) -> tuple[int | None, str]:
    """The version and signature an answered infer ran (its model name says it: ray_app.oip_api)."""
    return int(result.model_version), oip_api.split_name(predictor, result.model_name)


def _oip(method: str, handle: Handler, describe: Describe = _nothing) -> GrpcMethod:
    return GrpcMethod(OIP_GRPC, handle, lambda: oip_grpc.empty_response(method), describe)


def _tf(handle: Handler, empty: Callable[[], Any], describe: Describe = _tf_serving_spec) -> GrpcMethod:
    return GrpcMethod(TF_SERVING, handle, empty, describe)


METHODS: dict[str, GrpcMethod] = {
    # tensorflow.serving.PredictionService / ModelService
    "Predict": _tf(_predict, predict_pb2.PredictResponse),
    "GetModelMetadata": _tf(
        _sync(grpc_api.get_model_metadata), get_model_metadata_pb2.GetModelMetadataResponse
    ),
    "GetModelStatus": _tf(_sync(grpc_api.get_model_status), get_model_status_pb2.GetModelStatusResponse),
    "Classify": _tf(_sync(grpc_api.classify), classification_pb2.ClassificationResponse),
    "Regress": _tf(_sync(grpc_api.regress), regression_pb2.RegressionResponse),
    "MultiInference": _tf(_sync(grpc_api.multi_inference), inference_pb2.MultiInferenceResponse),
    "HandleReloadConfigRequest": _tf(_sync(_no_reload), model_management_pb2.ReloadConfigResponse),
    # inference.GRPCInferenceService (KServe v2 / Triton; ray_app.oip_grpc)
    "ServerLive": _oip("ServerLive", _sync(oip_grpc.server_live)),
    "ServerReady": _oip("ServerReady", _sync(oip_grpc.server_ready)),
    "ModelReady": _oip("ModelReady", _sync(oip_grpc.model_ready)),
    "ServerMetadata": _oip("ServerMetadata", _sync(oip_grpc.server_metadata)),
    "ModelMetadata": _oip("ModelMetadata", _sync(oip_grpc.model_metadata)),
    "ModelInfer": _oip("ModelInfer", _model_infer, _oip_inferred),
}
