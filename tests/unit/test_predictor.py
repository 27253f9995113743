"""The predictor with the real embedded backend and Ray Serve's real batcher (no cluster)."""

import asyncio
import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from ray_app.backends.embedded import EmbeddedBackend
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import InferenceRequest, Predictor
from ray_app.protocol.status import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tests.conftest import publish_copy
from tests.unit.conftest import run_on_replica_loop
from training.data import load_mnist

pytestmark = pytest.mark.usefixtures("replica_context")

TEST = load_mnist().test


def _run(store, body, live: LiveConfig | None = None, seed: int = 0, **config):
    async def main():
        app_config = AppConfig(model_base_path=str(store), poll_interval_s=0.2, **config)
        backend = EmbeddedBackend(app_config)
        await backend.start()
        predictor = Predictor(app_config, backend, rng=random.Random(seed))
        predictor.reconfigure(live or LiveConfig())
        try:
            return await body(predictor, backend)
        finally:
            await backend.stop()

    return run_on_replica_loop(main())


def _request(images=None, **kwargs):
    images = TEST.images[:4] if images is None else images
    return InferenceRequest(model_name="mnist", inputs={"images": images}, **kwargs)


def _png(array: np.ndarray, size: int = 28, invert: bool = False, mode: str = "L") -> bytes:
    image = Image.fromarray(255 - array if invert else array).resize((size, size)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record_calls(backend, record) -> None:
    """Wrap the real backend's predict so a test sees each backend call (one per batch group)."""
    original = backend.predict

    async def recording(version, signature, inputs, output_filter, **options):
        record(signature, inputs)
        return await original(version, signature, inputs, output_filter, **options)

    backend.predict = recording


def test_predicts_real_digits_and_reports_version(store):
    async def body(predictor, _):
        return await predictor.predict(_request(TEST.images[:200]))

    result = _run(store, body)
    assert result.version == 1 and result.signature_name == "serving_default"
    assert np.mean(result.outputs["classes"] == TEST.labels[:200]) >= 0.9
    assert result.outputs["probabilities"].shape == (200, 10)


def test_predict_images_signature_matches_default(store):
    async def body(predictor, _):
        flat = TEST.images[:16].reshape(16, 784).astype(np.float32) / 255.0
        scores = await predictor.predict(_request(flat, signature_name="predict_images"))
        default = await predictor.predict(_request(TEST.images[:16]))
        return scores, default

    scores, default = _run(store, body)
    np.testing.assert_array_equal(np.argmax(scores.outputs["scores"], 1), default.outputs["classes"])


def test_image_bytes_signature_any_size_polarity_and_colour(store):
    encoded = [
        _png(TEST.images[i], size, invert, mode)
        for i, (size, invert, mode) in enumerate(
            [(28, False, "L"), (100, True, "L"), (300, False, "RGB"), (57, True, "RGB")] * 5
        )
    ]
    labels = TEST.labels[: len(encoded)]

    async def body(predictor, _):
        request = InferenceRequest(
            model_name="mnist",
            signature_name="predict_image_bytes",
            inputs={"image_bytes": np.array(encoded, dtype=object)},
        )
        return await predictor.predict(request)

    result = _run(store, body)
    assert np.mean(result.outputs["classes"] == labels) >= 0.85


@pytest.mark.parametrize(
    ("request_kwargs", "error", "message"),
    [
        (
            {"images": TEST.images[:2].astype(np.float32)},
            InvalidArgumentError,
            "Expects arg[0] to be uint8 but float is provided",  # TF's own text, as TF Serving answers
        ),
        ({"images": TEST.images[:2, :20]}, InvalidArgumentError, "shape [2, 20, 28]"),
        ({"signature_name": "nope"}, FailedPreconditionError, 'Serving signature key "nope" not found.'),
        ({"version": 9}, NotFoundError, "Servable not found for request: Specific(mnist, 9)"),
        ({"version_label": "gold"}, InvalidArgumentError, "Unrecognized servable version label: gold"),
    ],
)
def test_bad_requests_get_clear_errors(store, request_kwargs, error, message):
    images = request_kwargs.pop("images", None)

    async def body(predictor, _):
        with pytest.raises(error) as info:
            await predictor.predict(_request(images, **request_kwargs))
        # and the predictor keeps serving
        ok = await predictor.predict(_request())
        return str(info.value), ok

    text, ok = _run(store, body)
    assert message in text
    assert ok.version == 1


def test_unknown_model_too_many_images_and_bad_image_bytes(store):
    async def body(predictor, _):
        with pytest.raises(NotFoundError, match=re.escape("Servable not found for request: Latest(other)")):
            await predictor.predict(InferenceRequest(model_name="other", inputs={"images": TEST.images[:1]}))
        with pytest.raises(ResourceExhaustedError, match="limit is 8"):
            await predictor.predict(_request(TEST.images[:9]))
        truncated = _png(TEST.images[0])[:40]
        with pytest.raises(InvalidArgumentError, match="image 0: .*decode"):
            await predictor.predict(
                InferenceRequest(
                    model_name="mnist",
                    signature_name="predict_image_bytes",
                    inputs={"image_bytes": np.array([truncated], dtype=object)},
                )
            )

    from ray_app.config import Limits

    _run(store, body, limits=Limits(max_images_per_request=8))


def _the_graphs_own_answer_to_an_empty_batch(version_dir):
    """What the SavedModel itself does with an empty batch on this machine: its outputs' shapes, or
    None where it raises INVALID_ARGUMENT. It depends on the machine: with the same pinned TensorFlow, earlier hosts
    raised INVALID_ARGUMENT from one of the CNN's kernels, and an AMD EPYC host answers empty outputs."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    try:
        outputs = signature(images=tf.constant(TEST.images[:0]))
    except tf.errors.InvalidArgumentError:
        return None
    return {name: tuple(value.shape) for name, value in outputs.items()}


def test_empty_batches_and_nan_run_as_in_tf_serving(store):
    """TF Serving checks neither: the graph decides. NaN pixels are answered (whatever the model
    makes of them); an empty batch gets what the graph itself gives on this machine: empty outputs,
    or the error of one of the CNN's kernels with TF's code and text (INVALID_ARGUMENT)."""
    shapes = _the_graphs_own_answer_to_an_empty_batch(store / "1")

    async def body(predictor, _):
        if shapes is None:
            with pytest.raises(InvalidArgumentError, match="Graph execution error"):
                await predictor.predict(_request(TEST.images[:0]))
        else:
            empty = await predictor.predict(_request(TEST.images[:0]))
            assert {name: value.shape for name, value in empty.outputs.items()} == shapes
        return await predictor.predict(
            _request(np.full((1, 784), np.nan, np.float32), signature_name="predict_images")
        )

    assert _run(store, body).outputs["scores"].shape == (1, 10)


def test_concurrent_requests_are_batched_by_image_count(store):
    calls: list[int] = []

    async def body(predictor, backend):
        _record_calls(backend, lambda signature, inputs: calls.append(len(next(iter(inputs.values())))))
        singles = [predictor.predict(_request(TEST.images[i : i + 1])) for i in range(12)]
        results = await asyncio.gather(*singles)
        return results

    results = _run(store, body, live=LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.05))
    assert [int(r.outputs["classes"][0]) for r in results] == _expected_classes(store, 12)
    assert sum(calls) == 12 and max(calls) <= 8 and len(calls) < 12  # real batches, capped at 8 images


def test_requests_that_fill_a_batch_skip_the_queue_and_run_concurrently(store):
    """Serve runs one batch at a time; a request as big as a batch gains nothing from queueing."""
    in_flight, peak = [0], [0]

    async def body(predictor, backend):
        original = backend.predict

        async def slow(version, signature, inputs, output_filter, **options):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            try:
                await asyncio.sleep(0.2)
                return await original(version, signature, inputs, output_filter, **options)
            finally:
                in_flight[0] -= 1

        backend.predict = slow
        full = [predictor.predict(_request(TEST.images[i * 8 : i * 8 + 8])) for i in range(3)]
        return await asyncio.gather(*full)

    results = _run(store, body, live=LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.05))
    assert [len(r.outputs["classes"]) for r in results] == [8, 8, 8]
    assert peak[0] == 3  # all three ran at once, none waited for another's batch


def _expected_classes(store, n):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(store / "1"))
    return (
        loaded.signatures["serving_default"](images=tf.constant(TEST.images[:n]))["classes"].numpy().tolist()
    )


def test_different_signatures_never_share_a_backend_call(store):
    calls: list[str] = []

    async def body(predictor, backend):
        _record_calls(backend, lambda signature, inputs: calls.append(signature))
        flat = TEST.images[:1].reshape(1, 784).astype(np.float32) / 255.0
        await asyncio.gather(
            predictor.predict(_request(TEST.images[:1])),
            predictor.predict(_request(flat, signature_name="predict_images")),
            predictor.predict(_request(TEST.images[1:2])),
        )

    _run(store, body, live=LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.05))
    # the first ran alone (nothing else in flight); the other two were batched, then split by signature
    assert sorted(calls) == ["predict_images", "serving_default", "serving_default"]


def test_live_reconfigure_changes_batch_limit(store):
    calls: list[int] = []

    async def body(predictor, backend):
        _record_calls(backend, lambda signature, inputs: calls.append(len(next(iter(inputs.values())))))
        predictor.reconfigure(LiveConfig(max_batch_size=1, batch_wait_timeout_s=0.05))
        await asyncio.gather(*(predictor.predict(_request(TEST.images[i : i + 1])) for i in range(4)))
        assert calls == [1, 1, 1, 1]
        calls.clear()
        predictor.reconfigure(LiveConfig(max_batch_size=4, batch_wait_timeout_s=0.05))
        await asyncio.gather(*(predictor.predict(_request(TEST.images[i : i + 1])) for i in range(5)))
        assert calls == [1, 4]  # the first alone (the backend was idle), then one batch of 4

    _run(store, body)


def test_new_version_is_loaded_and_pinned_old_version_still_answers(store, trained_export):
    async def body(predictor, backend):
        assert (await predictor.predict(_request())).version == 1
        publish_copy(trained_export, store, 2)
        for _ in range(50):
            if backend.versions() == [1, 2]:
                break
            await asyncio.sleep(0.1)
        latest = await predictor.predict(_request())
        pinned = await predictor.predict(_request(version=1))
        return latest.version, pinned.version

    assert _run(store, body) == (2, 1)


def test_labels_and_canary_split(store, trained_export):
    publish_copy(trained_export, store, 2)
    live = LiveConfig(version_labels={"stable": 1, "canary": 2}, canary_traffic_percent=25)

    async def body(predictor, _):
        unpinned = [(await predictor.predict(_request(TEST.images[:1]))).version for _ in range(200)]
        stable = (await predictor.predict(_request(version_label="stable"))).version
        canary = (await predictor.predict(_request(version_label="canary"))).version
        return unpinned, stable, canary

    unpinned, stable, canary = _run(store, body, live=live)
    assert (stable, canary) == (1, 2)
    share = unpinned.count(2) / len(unpinned)
    assert 0.15 <= share <= 0.35, share


def test_labelled_old_version_stays_loaded(store, trained_export):
    for version in (2, 3):
        publish_copy(trained_export, store, version)

    async def body(predictor, backend):
        await backend.sync()  # apply the pinned label
        return backend.versions(), (await predictor.predict(_request(version_label="stable"))).version

    versions, answered = _run(store, body, live=LiveConfig(version_labels={"stable": 1}), num_versions=1)
    assert versions == [1, 3] and answered == 1


def test_empty_store_is_healthy_and_waits_for_a_first_version(tmp_path, trained_export):
    async def body(predictor, backend):
        assert backend.health_problem() is None  # healthy: Serve must not restart the replica
        with pytest.raises(NotFoundError, match="waiting for the first one to be published"):
            await predictor.predict(_request())
        with pytest.raises(NotFoundError, match="Could not find any versions of model mnist"):
            predictor.status("mnist", None)
        publish_copy(trained_export, tmp_path / "empty", 1)
        for _ in range(50):
            if backend.versions():
                break
            await asyncio.sleep(0.1)
        return (await predictor.predict(_request())).version

    assert _run(tmp_path / "empty", body) == 1


def test_canary_share_needs_a_canary_label():
    with pytest.raises(ValueError, match="canary"):
        LiveConfig(canary_traffic_percent=10)


def test_a_lone_request_does_not_wait_for_a_batch_but_a_busy_backend_gathers_them(store):
    """Nothing in flight: the request runs at once (no batch wait). While one runs, the next ones
    wait for the batch and go together."""
    calls: list[int] = []

    async def body(predictor, backend):
        _record_calls(backend, lambda signature, inputs: calls.append(len(next(iter(inputs.values())))))
        started = asyncio.get_running_loop().time()
        await predictor.predict(_request(TEST.images[:1]))
        alone_s = asyncio.get_running_loop().time() - started
        await asyncio.gather(*(predictor.predict(_request(TEST.images[i : i + 1])) for i in range(6)))
        return alone_s

    alone_s = _run(store, body, live=LiveConfig(max_batch_size=8, batch_wait_timeout_s=1.0))
    assert alone_s < 0.5  # far below the 1 s batch wait
    assert calls == [1, 1, 5]  # alone; then the first of six alone, the other five in one batch
