"""TF Serving's protobuf modules without TensorFlow's runtime (see :mod:`ray_app.protocol.generate`).

The messages are the very ones ``tensorflow_serving.apis`` defines (same descriptors, same
classes when both are imported), so they mix freely with TensorFlow's own modules.
"""

from __future__ import annotations

from ray_app.protocol._generated.tensorflow.core.framework import (
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from ray_app.protocol._generated.tensorflow.core.protobuf import (
    error_codes_pb2,
    meta_graph_pb2,
    saved_model_pb2,
)
from ray_app.protocol._generated.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)
from ray_app.protocol._generated.tensorflow_serving.config import model_server_config_pb2

__all__ = [
    "classification_pb2",
    "error_codes_pb2",
    "get_model_metadata_pb2",
    "get_model_status_pb2",
    "inference_pb2",
    "meta_graph_pb2",
    "model_management_pb2",
    "model_pb2",
    "model_server_config_pb2",
    "predict_pb2",
    "regression_pb2",
    "saved_model_pb2",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]
