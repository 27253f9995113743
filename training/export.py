"""Export a trained model as a TF Serving SavedModel with its evidence (metrics, warmup).

Signatures (the contract with serving):

``serving_default``
    ``images``: uint8 ``[N, 28, 28]``, white digit on black (MNIST convention).
    Returns ``probabilities`` float32 ``[N, 10]`` and ``classes`` int64 ``[N]``.
``predict_images``
    TF Serving's own MNIST example: ``images`` float32 ``[N, 784]`` in [0, 1].
    Returns ``scores`` float32 ``[N, 10]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from ray_app import model_store

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"


class ServingModule(tf.Module):
    """The exported object; ``model`` is tracked so a version's variables can seed fine-tuning."""

    def __init__(self, model: tf.Module) -> None:
        super().__init__(name="mnist_serving")
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="images")])
    def serve_uint8(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model(tf.cast(images, tf.float32) / 255.0, training=False)
        probabilities = tf.nn.softmax(logits)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")])
    def predict_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model(tf.reshape(images, [-1, 28, 28]), training=False)
        return {"scores": tf.nn.softmax(logits)}


def save_model(model: tf.Module, export_dir: Path) -> None:
    """Write ``model`` as a SavedModel with both signatures into ``export_dir``."""
    module = ServingModule(model)
    signatures = {
        SERVING_DEFAULT: module.serve_uint8.get_concrete_function(),
        PREDICT_IMAGES: module.predict_images.get_concrete_function(),
    }
    tf.saved_model.save(module, str(export_dir), signatures=signatures)


def write_warmup_requests(export_dir: Path, model_name: str, images: np.ndarray) -> Path:
    """TF Serving warmup records: one PredictionLog per signature, real digits as inputs."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    extra = export_dir / model_store.EXTRA_DIR
    extra.mkdir(exist_ok=True)
    path = extra / model_store.WARMUP_FILE
    batches = {
        SERVING_DEFAULT: images.astype(np.uint8),
        PREDICT_IMAGES: images.reshape(len(images), 784).astype(np.float32) / 255.0,
    }
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, batch in batches.items():
            for size in (1, len(batch)):
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
                )
                request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch[:size]))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
    return path


def write_metrics(export_dir: Path, metrics: dict[str, Any]) -> Path:
    extra = export_dir / model_store.EXTRA_DIR
    extra.mkdir(exist_ok=True)
    path = extra / model_store.METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def load_classifier(export_dir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 images [N, 28, 28] to predicted digits [N], through ``serving_default``."""
    serve = tf.saved_model.load(str(export_dir)).signatures[SERVING_DEFAULT]

    def classify(images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0,), dtype=np.int64)
        return np.concatenate(
            [
                serve(images=tf.constant(images[i : i + 2000]))["classes"].numpy()
                for i in range(0, len(images), 2000)
            ]
        )

    return classify


def evaluate_saved_model(export_dir: str | Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Test accuracy of a SavedModel through its ``serving_default`` signature."""
    return float(np.mean(load_classifier(export_dir)(images) == labels))
