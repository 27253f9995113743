"""The MNIST classifier: a small CNN on float32 images ``[N, 28, 28]`` in [0, 1].

MNIST convention: white (1.0) digit on black (0.0). The exported signatures add the
uint8 and flat ``[N, 784]`` front ends on top of this one model.
"""

from __future__ import annotations

import keras

NUM_CLASSES = 10
ARCHITECTURE = "cnn-32x2-64x2-256-bn-v3"


DEFAULT_BN_MOMENTUM = 0.99  # Keras' default


def bn_momentum_for(total_steps: int) -> float:
    """Batch-norm momentum for a run of ``total_steps``: Keras' 0.99, or less for short runs.

    The moving statistics average the last ~1 / (1 - momentum) batches, starting from mean 0 and
    variance 1; a run must be several times longer for them to settle (with 0.99, 234 steps left
    a model at 40 % test accuracy although it classified 94 % of its training batches). The
    default 12-epoch run (5,628 steps) keeps 0.99.
    """
    return min(DEFAULT_BN_MOMENTUM, 1.0 - 10.0 / max(total_steps, 20))


def _conv(x: keras.KerasTensor, filters: int, bn_momentum: float) -> keras.KerasTensor:
    """3x3 convolution, batch normalisation, ReLU."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=bn_momentum)(x)
    return keras.layers.ReLU()(x)


def build_model(dropout: float = 0.25, bn_momentum: float = DEFAULT_BN_MOMENTUM) -> keras.Model:
    """A 2-block CNN (two 3x3 convolutions per block) with batch normalisation, ~0.87M parameters,
    returning logits ``[N, 10]``.

    Measured with the default 12 epochs of augmented data (training/augment.py): the previous
    network (one 64-filter convolution, 128 units, no batch normalisation) reached 99.49 %, with
    batch normalisation 99.58 %; the second convolution and 256 units are the capacity that
    augmented digits need to pass 99.6 % in 12 epochs.
    """
    inputs = keras.Input(shape=(28, 28), dtype="float32", name="images")
    x = keras.layers.Reshape((28, 28, 1))(inputs)
    x = _conv(x, 32, bn_momentum)
    x = _conv(x, 32, bn_momentum)
    x = keras.layers.MaxPooling2D()(x)
    x = _conv(x, 64, bn_momentum)
    x = _conv(x, 64, bn_momentum)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="mnist_cnn")
