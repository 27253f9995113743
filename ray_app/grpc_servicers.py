"""gRPC service registration for Ray Serve's proxy, without importing TensorFlow (or tritonclient).

The stock ``*_pb2_grpc.add_*Servicer_to_server`` functions import all of TensorFlow into
the proxy actor (~724 MiB vs ~210 MiB). These register the same method paths as TF
Serving's ``PredictionService`` and ``ModelService`` with raw-bytes handlers: the proxy
forwards the request bytes and the replica parses them. Wire-compatible with every
stock TF Serving client. Name them in ``grpc_options.grpc_servicer_functions``.
"""

from __future__ import annotations

from typing import Any

import grpc

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
PREDICTION_METHODS = ("Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata")
MODEL_SERVICE = "tensorflow.serving.ModelService"
MODEL_METHODS = ("GetModelStatus", "HandleReloadConfigRequest")
# The Open Inference Protocol's service (KServe v2 / Triton): the methods ray_app.oip_grpc answers.
# Serve routes by the last path segment: none of these names is one of TF Serving's.
INFERENCE_SERVICE = "inference.GRPCInferenceService"
INFERENCE_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
)


def _add_raw_service(service: str, methods: tuple[str, ...], servicer: Any, server: Any) -> None:
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=None, response_serializer=None
        )
        for method in methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def add_PredictionServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """Register ``tensorflow.serving.PredictionService`` (requests reach replicas as bytes)."""
    _add_raw_service(PREDICTION_SERVICE, PREDICTION_METHODS, servicer, server)


def add_ModelServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """Register ``tensorflow.serving.ModelService`` (requests reach replicas as bytes)."""
    _add_raw_service(MODEL_SERVICE, MODEL_METHODS, servicer, server)


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """Register ``inference.GRPCInferenceService``'s unary methods that this server implements
    (requests reach replicas as bytes; the others answer gRPC's own UNIMPLEMENTED)."""
    _add_raw_service(INFERENCE_SERVICE, INFERENCE_METHODS, servicer, server)
