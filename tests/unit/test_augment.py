"""training.augment on real MNIST digits (TensorFlow, no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from training.augment import AugmentConfig, augment_batch
from training.data import load_mnist

NONE = AugmentConfig(
    keep_share=0.0, rotation_deg=0.0, scale=0.0, aspect=0.0, shear=0.0, shift_px=0.0, elastic_px=0.0,
    thicken_share=0.0, thin_share=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def digits() -> tf.Tensor:
    images = load_mnist().test.images[:64].astype(np.float32) / 255.0
    return tf.constant(images / images.max(axis=(1, 2), keepdims=True))  # ink peaks at 1, as served


def test_no_change_asked_gives_the_same_images(digits: tf.Tensor) -> None:
    np.testing.assert_allclose(augment_batch(digits, NONE).numpy(), digits.numpy(), atol=1e-5)


def test_keep_share_one_keeps_every_image(digits: tf.Tensor) -> None:
    config = dataclasses.replace(AugmentConfig(), keep_share=1.0)
    np.testing.assert_array_equal(augment_batch(digits, config).numpy(), digits.numpy())


def test_default_changes_most_images_but_keeps_them_digits(digits: tf.Tensor) -> None:
    tf.random.set_seed(0)
    out = augment_batch(digits).numpy()
    assert out.shape == digits.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and np.allclose(
        out.max(axis=(1, 2)), 1.0, atol=1e-5
    )  # peak 1, like served inputs
    changed = np.abs(out - digits.numpy()).max(axis=(1, 2)) > 0.05
    assert 0.6 < changed.mean() < 0.95  # keep_share 0.2 stays as it is
    mass_ratio = out.sum(axis=(1, 2)) / digits.numpy().sum(axis=(1, 2))
    assert 0.4 < np.median(mass_ratio) < 2.0 and mass_ratio.min() > 0.2  # no digit wiped out


def _radius(images: np.ndarray) -> np.ndarray:
    """Mean distance of the ink from the image centre, per image."""
    y, x = np.mgrid[0:28, 0:28] - 13.5
    r = np.hypot(x, y)
    return (images * r).sum(axis=(1, 2)) / images.sum(axis=(1, 2))


def test_rotation_turns_about_the_centre(digits: tf.Tensor) -> None:
    config = dataclasses.replace(NONE, rotation_deg=45.0)
    out = augment_batch(digits, config).numpy()
    ratio = _radius(out) / _radius(digits.numpy())
    assert 0.93 < ratio.min() and ratio.max() < 1.07  # the ink keeps its distance from the centre
    corr = np.array([np.corrcoef(o.ravel(), d.ravel())[0, 1] for o, d in zip(out, digits.numpy())])
    assert np.median(corr) < 0.9  # but it moved


def test_zoom_scales_about_the_centre(digits: tf.Tensor) -> None:
    config = dataclasses.replace(NONE, scale=0.3)
    ratio = _radius(augment_batch(digits, config).numpy()) / _radius(digits.numpy())
    assert 0.65 < ratio.min() < 0.85 and 1.15 < ratio.max() < 1.35


@pytest.mark.parametrize(("field", "thicker"), [("thicken_share", True), ("thin_share", False)])
def test_stroke_width(digits: tf.Tensor, field: str, thicker: bool) -> None:
    config = dataclasses.replace(NONE, **{field: 1.0})
    before = digits.numpy().sum(axis=(1, 2))
    after = augment_batch(digits, config).numpy().sum(axis=(1, 2))
    if thicker:
        assert (after >= before - 1e-3).all() and np.median(after / before) > 1.1
    else:
        assert (after <= before + 1e-3).all() and np.median(after / before) < 0.9 and after.min() > 0


def test_elastic_distortion_is_smooth(digits: tf.Tensor) -> None:
    config = dataclasses.replace(NONE, elastic_px=1.5)
    out = augment_batch(digits, config).numpy()
    diff = np.abs(out - digits.numpy()).mean(axis=(1, 2))
    assert diff.mean() > 0.01  # it moves ink
    corr = [np.corrcoef(o.ravel(), d.ravel())[0, 1] for o, d in zip(out, digits.numpy())]
    assert np.median(corr) > 0.6  # but bends, does not scramble


def test_the_last_epochs_keep_more_images_as_they_are() -> None:
    from training.data import Split
    from training.loop import make_dataset

    test = load_mnist().test
    split = Split(test.images[:256], test.labels[:256])
    originals = {image.tobytes() for image in (split.images.astype(np.float32) / 255.0)}
    # Batches 0-1 of the run are early, 2-3 late; a resumed run starts counting at batch 1.
    dataset = make_dataset(split, 256, seed=0, augment=True, first_batch=1, late_from_batch=2)
    untouched = [
        sum(image.tobytes() in originals for image in images.numpy()) / 256 for images, _ in dataset.take(3)
    ]
    config = AugmentConfig()
    assert abs(untouched[0] - config.keep_share) < 0.12  # batch 1: early
    assert abs(untouched[1] - config.late_keep_share) < 0.12  # batches 2, 3: late
    assert abs(untouched[2] - config.late_keep_share) < 0.12
