"""Names on the wire: the model's signatures, their inputs and outputs, and the app's own headers."""

from __future__ import annotations

SERVING_DEFAULT = "serving_default"  # images: uint8 [N,28,28] -> probabilities, classes
PREDICT_IMAGES = "predict_images"  # TF Serving's MNIST example: images float32 [N,784] -> scores
IMAGE_BYTES_SIGNATURE = "predict_image_bytes"  # added by the app: encoded images -> serving_default
IMAGE_BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
PROBABILITIES_OUTPUT = "probabilities"
CLASSES_OUTPUT = "classes"
SCORES_OUTPUT = "scores"
NUM_CLASSES = 10

# Added by the app to TF Serving's REST API: REST predict responses name the version that answered
# in this header (TF Serving's JSON has no field for it; gRPC responses carry model_spec.version).
MODEL_VERSION_HEADER = "X-Model-Version"
