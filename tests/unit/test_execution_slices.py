"""The embedded backend runs a large batch in slices of ``max_execution_batch_size`` images, so a
request's size cannot multiply the model's activation memory (docs/limits.md)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ray_app.backends.embedded import LoadedVersion, load_version, run_signature
from ray_app.protocol.status import DeadlineExceededError
from training.data import load_mnist


def _recording(calls: list[int], outputs) -> LoadedVersion:
    """A version whose one signature records the images of every call it gets."""

    def function(images):
        calls.append(int(images.shape[0]))
        return outputs(images)

    return LoadedVersion(1, None, {"serving_default": function}, {})


def _per_image(images):
    import tensorflow as tf

    return {"double": tf.cast(images, tf.float32) * 2, "first": tf.cast(images[:, 0, 0], tf.int64)}


def test_a_batch_larger_than_the_limit_runs_in_slices_and_answers_as_one_call() -> None:
    calls: list[int] = []
    images = np.random.default_rng(0).integers(0, 256, (300, 28, 28), dtype=np.uint8)
    answer = run_signature(_recording(calls, _per_image), "serving_default", {"images": images}, (), 128)
    assert calls == [128, 128, 44]
    np.testing.assert_array_equal(answer["double"], images.astype(np.float32) * 2)
    np.testing.assert_array_equal(answer["first"], images[:, 0, 0])


def test_a_batch_within_the_limit_is_one_call_and_the_filter_holds() -> None:
    calls: list[int] = []
    images = np.zeros((128, 28, 28), np.uint8)
    answer = run_signature(
        _recording(calls, _per_image), "serving_default", {"images": images}, ("first",), 128
    )
    assert calls == [128] and set(answer) == {"first"}
    sliced = run_signature(
        _recording(calls, _per_image), "serving_default", {"images": images}, ("first",), 50
    )
    assert calls == [128, 50, 50, 28] and set(sliced) == {"first"}


def test_outputs_that_are_not_one_row_per_image_run_the_batch_whole() -> None:
    import tensorflow as tf

    calls: list[int] = []
    images = np.ones((300, 28, 28), np.uint8)
    version = _recording(calls, lambda x: {"total": tf.reduce_sum(tf.cast(x, tf.int64))})
    answer = run_signature(version, "serving_default", {"images": images}, (), 128)
    assert calls == [128, 300]  # the first slice shows the output is not per image
    assert int(answer["total"]) == 300 * 28 * 28


def test_inputs_without_a_shared_batch_dimension_run_whole() -> None:
    calls: list[int] = []
    version = LoadedVersion(1, None, {"f": lambda a, b: calls.append(int(a.shape[0])) or {"a": a}}, {})
    run_signature(version, "f", {"a": np.zeros((300, 2)), "b": np.zeros((3,))}, (), 128)
    assert calls == [300]


def test_no_slice_starts_after_the_deadline() -> None:
    calls: list[int] = []
    images = np.zeros((300, 28, 28), np.uint8)
    with pytest.raises(DeadlineExceededError):
        run_signature(
            _recording(calls, _per_image),
            "serving_default",
            {"images": images},
            (),
            128,
            time.monotonic() - 1,
        )
    assert calls == []


def test_the_trained_model_answers_a_sliced_batch_as_it_answers_it_whole(trained_export) -> None:
    loaded = load_version(trained_export, 1)
    images = load_mnist().test.images[:300]
    whole = run_signature(loaded, "serving_default", {"images": images}, ())
    sliced = run_signature(loaded, "serving_default", {"images": images}, (), 128)
    assert set(sliced) == set(whole)
    for name in whole:
        np.testing.assert_allclose(sliced[name], whole[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sliced["classes"], whole["classes"])
