"""On-the-fly augmentation of MNIST batches inside tf.data: the ways real digits differ.

One random warp per image (rotation, scale, aspect, shear, shift and a smooth elastic
distortion, composed into a single bilinear resampling), then a random stroke width (a
fractional grey-level dilation, or the soft edge shaved off), then the ink is stretched back to peak at 1, as
:mod:`ray_app.preprocessing` does for every real input. A share of each batch stays as it is,
so the model keeps seeing MNIST itself. Everything works on whole batches (no Python per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

SIZE_PX = 28


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes (uniform in ``[-x, x]`` unless said otherwise)."""

    keep_share: float = 0.3  # images left untouched
    rotation_deg: float = 10.0
    scale: float = 0.08  # isotropic zoom 1 +- scale
    aspect: float = 0.1  # x stretched by 1 +- aspect
    shear: float = 0.2  # x shifted by shear * (y - centre)
    shift_px: float = 2.0
    elastic_px: float = 0.8  # standard deviation of the displacement at the coarse grid points
    elastic_grid: int = 4  # coarse grid (per side) the displacement is interpolated from
    thicken_share: float = 0.2  # images whose strokes get wider (dilation, up to 1 px each side)
    thin_share: float = 0.15  # images whose strokes get thinner (soft edge shaved off)
    # The last epochs keep more images as they are, so the weights and the batch-norm statistics
    # settle on real digits (augmentation annealing, as object detectors turn mosaics off at the end).
    late_epochs: int = 2
    late_keep_share: float = 0.7


def keep_share(
    batch_index: tf.Tensor, late_from_batch: int, config: AugmentConfig = AugmentConfig()
) -> tf.Tensor:
    """The share of a batch left untouched: ``keep_share``, or ``late_keep_share`` from ``late_from_batch`` on."""
    late = tf.cast(batch_index, tf.int64) >= late_from_batch
    return tf.where(late, config.late_keep_share, config.keep_share)


def augment_batch(
    images: tf.Tensor, config: AugmentConfig = AugmentConfig(), keep: tf.Tensor | float | None = None
) -> tf.Tensor:
    """Randomly warp and re-stroke float32 images ``[B, 28, 28]`` in [0, 1]; same shape back.

    ``keep`` overrides ``config.keep_share`` (a tensor, for a schedule: :func:`keep_share`).
    """
    batch = tf.shape(images)[0]
    ys, xs = _sampling_grid(batch, config)
    warped = _bilinear(images, ys, xs)
    warped = _stroke_width(warped, batch, config)
    peak = tf.reduce_max(warped, axis=[1, 2], keepdims=True)
    warped = tf.where(peak > 0.05, warped / tf.maximum(peak, 1e-6), images)  # a warp that lost the digit
    share = config.keep_share if keep is None else keep
    untouched = tf.random.uniform([batch, 1, 1]) < share
    return tf.where(untouched, images, warped)


def _uniform(batch: tf.Tensor, limit: float) -> tf.Tensor:
    return tf.random.uniform([batch], -limit, limit)


def _sampling_grid(batch: tf.Tensor, config: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Where each output pixel reads from: an inverse affine map plus an elastic displacement."""
    angle = _uniform(batch, math.radians(config.rotation_deg))
    zoom = 1.0 + _uniform(batch, config.scale)
    stretch = 1.0 + _uniform(batch, config.aspect)
    shear = _uniform(batch, config.shear)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Forward map (input -> output) around the centre: rotate . shear . scale; we need its inverse.
    a, b = zoom * stretch * cos, zoom * (shear * cos - sin)
    c, d = zoom * stretch * sin, zoom * (shear * sin + cos)
    det = a * d - b * c
    inv = [d / det, -b / det, -c / det, a / det]
    centre = (SIZE_PX - 1) / 2.0
    coords = tf.range(SIZE_PX, dtype=tf.float32) - centre
    yy, xx = tf.meshgrid(coords, coords, indexing="ij")
    shift_x = _uniform(batch, config.shift_px)[:, None, None]
    shift_y = _uniform(batch, config.shift_px)[:, None, None]
    ox, oy = xx[None] - shift_x, yy[None] - shift_y
    xs = inv[0][:, None, None] * ox + inv[1][:, None, None] * oy + centre
    ys = inv[2][:, None, None] * ox + inv[3][:, None, None] * oy + centre
    if config.elastic_px > 0:
        coarse = tf.random.normal(
            [batch, config.elastic_grid, config.elastic_grid, 2], stddev=config.elastic_px
        )
        field = tf.image.resize(coarse, [SIZE_PX, SIZE_PX], method="bicubic")
        xs += field[..., 0]
        ys += field[..., 1]
    return ys, xs


def _bilinear(images: tf.Tensor, ys: tf.Tensor, xs: tf.Tensor) -> tf.Tensor:
    """Sample ``images`` [B, H, W] at float coordinates [B, H, W]; outside the image is 0."""
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1]])
    height, width = SIZE_PX + 2, SIZE_PX + 2
    ys = tf.clip_by_value(ys + 1.0, 0.0, height - 1.001)
    xs = tf.clip_by_value(xs + 1.0, 0.0, width - 1.001)
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = ys - y0, xs - x0
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    flat = tf.reshape(padded, [tf.shape(images)[0], height * width])

    def at(y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        index = tf.reshape(y * width + x, [tf.shape(images)[0], -1])
        return tf.reshape(tf.gather(flat, index, batch_dims=1), tf.shape(ys))

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def _stroke_width(images: tf.Tensor, batch: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Thicker strokes (blend towards a 3x3 dilation) or thinner ones (shave the soft edge)."""
    dilated = tf.nn.max_pool2d(images[..., None], 3, 1, "SAME")[..., 0]
    choice = tf.random.uniform([batch])
    amount = tf.random.uniform([batch, 1, 1])
    thicken = (choice < config.thicken_share)[:, None, None]
    thin = ((choice >= config.thicken_share) & (choice < config.thicken_share + config.thin_share))[
        :, None, None
    ]
    # A 3x3 erosion wipes out MNIST's 2 px strokes; raising the black level by up to 0.6 of the
    # peak and stretching back removes the anti-aliased edge (up to about 1 px) instead.
    level = 0.6 * amount
    shaved = tf.nn.relu(images - level) / (1.0 - level)
    out = tf.where(thicken, images + amount * (dilated - images), images)
    return tf.where(thin, shaved, out)
