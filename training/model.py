"""The MNIST classifier: a small CNN on float32 images ``[N, 28, 28]`` in [0, 1].

MNIST convention: white (1.0) digit on black (0.0). The exported signatures add the
uint8 and flat ``[N, 784]`` front ends on top of this one model.
"""

from __future__ import annotations

import keras

NUM_CLASSES = 10
ARCHITECTURE = "cnn-32-64-128-v1"


def build_model(dropout: float = 0.4) -> keras.Model:
    """A 2-block CNN with ~0.42M parameters returning logits ``[N, 10]``."""
    inputs = keras.Input(shape=(28, 28), dtype="float32", name="images")
    x = keras.layers.Reshape((28, 28, 1))(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="mnist_cnn")
