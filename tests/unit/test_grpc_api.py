"""ray_app.grpc_api without Ray or TensorFlow: TF Serving's answers and texts, and hostile requests
refused cheaply (time and memory measured), through the real predictor and Serve's real batcher."""

from __future__ import annotations

import random
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_app import grpc_api
from ray_app.backends.base import VersionState
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol.protos import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
    tensor_pb2,
    types_pb2,
)
from ray_app.protocol.status import ServingError, StatusCode
from ray_app.protocol.tensors import from_ndarray, to_ndarray
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend, fake_probabilities

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGES = (np.arange(4 * 28 * 28) % 256).astype(np.uint8).reshape(4, 28, 28)


def _predictor(backend: StaticBackend | None = None, **live) -> Predictor:
    predictor = Predictor(AppConfig(), backend or StaticBackend(versions=(1, 2)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig(**live))
    return predictor


def _request(images: np.ndarray | None = None, name: str = "mnist", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    if images is not None:
        request.inputs["images"].CopyFrom(from_ndarray(images, tensor_content=True))
    return request


def _call(handler, request, predictor: Predictor | None = None):
    predictor = predictor or _predictor()

    async def main():
        result = handler(predictor, request.SerializeToString())
        return await result if hasattr(result, "__await__") else result

    return run_on_replica_loop(main())


def _error(handler, request, predictor: Predictor | None = None) -> ServingError:
    with pytest.raises(ServingError) as info:
        _call(handler, request, predictor)
    return info.value


# -- Predict: TF Serving's answer -----------------------------------------------------------------
def test_predict_answers_in_typed_fields_and_echoes_the_model_spec() -> None:
    response = _call(grpc_api.predict, _request(IMAGES))
    assert response.model_spec.name == "mnist" and response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"  # filled in when left empty
    probabilities = response.outputs["probabilities"]
    assert len(probabilities.float_val) == 40 and not probabilities.tensor_content
    assert list(response.outputs["classes"].int64_val) == fake_probabilities(IMAGES).argmax(1).tolist()
    labelled = _call(
        grpc_api.predict, _request(IMAGES, version_label="stable"), _predictor(version_labels={"stable": 1})
    )
    assert labelled.model_spec.version.value == 1 and not labelled.model_spec.version_label


def test_output_filter_and_tf_servings_mnist_example_signature() -> None:
    request = _request(IMAGES, version=1)
    request.output_filter.append("classes")
    response = _call(grpc_api.predict, request)
    assert list(response.outputs) == ["classes"]
    flat = predict_pb2.PredictRequest()
    flat.model_spec.name, flat.model_spec.signature_name = "mnist", "predict_images"
    flat.inputs["images"].CopyFrom(from_ndarray(IMAGES.reshape(4, 784).astype(np.float32) / 255))
    scores = _call(grpc_api.predict, flat).outputs["scores"]
    assert len(scores.float_val) == 40  # what mnist_client.py reads


@pytest.mark.parametrize(
    ("request_factory", "code", "message"),
    [
        (lambda: predict_pb2.PredictRequest(), StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        (lambda: _request(IMAGES, name=""), StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        (
            lambda: _request(IMAGES, name="m"),
            StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(m)",
        ),
        (
            lambda: _request(IMAGES, version=7),
            StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(mnist, 7)",
        ),
        (
            lambda: _request(IMAGES, version_label="gold"),
            StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: gold",
        ),
        (
            lambda: _request(IMAGES, signature_name="nope"),
            StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
        (
            lambda: _with_inputs(_request(IMAGES), extra=IMAGES),
            StatusCode.INVALID_ARGUMENT,
            "input size does not match signature: 2!=1 len({extra,images}) != len({images}). "
            "Sent extra: {extra}. Missing but required: {}.",
        ),
        (
            lambda: _with_inputs(_request(), pixels=IMAGES),
            StatusCode.INVALID_ARGUMENT,
            "Signature input alias: images(feed name: serving_default_images:0) not found in request and no "
            "default value provided. Inputs expected to be in the request {pixels}, or default input alias set: ",
        ),
        (
            lambda: _with_inputs(_request(), images=IMAGES.astype(np.float32)),
            StatusCode.INVALID_ARGUMENT,
            "Expects arg[0] to be uint8 but float is provided",
        ),
        (
            lambda: _with_filter(_request(IMAGES), "scores"),
            StatusCode.INVALID_ARGUMENT,
            "output tensor alias not found in signature: scores Outputs expected to be in the set "
            "{classes,probabilities}.",
        ),
        (
            lambda: _with_filter(_request(IMAGES), "classes", "classes"),
            StatusCode.INVALID_ARGUMENT,
            "duplicate output tensor alias: classes",
        ),
        (
            lambda: _with_tensor(
                _request(), tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=b"xx")
            ),
            StatusCode.INVALID_ARGUMENT,
            "tensor parsing error: images",
        ),
    ],
)
def test_predict_errors_are_tf_servings(request_factory, code, message) -> None:
    error = _error(grpc_api.predict, request_factory())
    assert (error.code, error.message) == (code, message)


def _with_inputs(request: predict_pb2.PredictRequest, **arrays: np.ndarray) -> predict_pb2.PredictRequest:
    for name, array in arrays.items():
        request.inputs[name].CopyFrom(from_ndarray(array, tensor_content=True))
    return request


def _with_filter(request: predict_pb2.PredictRequest, *aliases: str) -> predict_pb2.PredictRequest:
    request.output_filter.extend(aliases)
    return request


def _with_tensor(
    request: predict_pb2.PredictRequest, tensor: tensor_pb2.TensorProto
) -> predict_pb2.PredictRequest:
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    request.inputs["images"].CopyFrom(tensor)
    return request


# -- hostile input ----------------------------------------------------------------------------------
def _declared(dtype: int, shape: list[int], **values) -> predict_pb2.PredictRequest:
    request = _request(signature_name="predict_images" if dtype == types_pb2.DT_FLOAT else "")
    tensor = request.inputs["images"]
    tensor.dtype = dtype
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    for field, value in values.items():
        getattr(tensor, field).append(value)
    return request


@pytest.mark.parametrize(
    ("request_factory", "code"),
    [
        # the ~60-byte request that was expanded to 3.1 GB before any check
        (
            lambda: _declared(types_pb2.DT_UINT8, [4_000_000, 28, 28], int_val=1),
            StatusCode.RESOURCE_EXHAUSTED,
        ),
        # the one that ended in INTERNAL: now the dtype is refused before anything is decoded
        (
            lambda: _declared(types_pb2.DT_DOUBLE, [2_000_000_000, 28, 28], double_val=1.0),
            StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: _declared(types_pb2.DT_FLOAT, [2_000_000_000, 784], float_val=1.0),
            StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda: _declared(types_pb2.DT_UINT8, [2**62, 2**62, 2**62], int_val=1),
            StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: _declared(types_pb2.DT_UINT8, [1000, -28, 28], int_val=1), StatusCode.INVALID_ARGUMENT),
    ],
)
def test_tiny_requests_declaring_huge_tensors_are_refused_cheaply(request_factory, code) -> None:
    request = request_factory()
    assert len(request.SerializeToString()) < 100
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = _error(grpc_api.predict, request)
        elapsed_s = time.perf_counter() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.code == code, error.message
    assert elapsed_s < 0.5 and peak_bytes < 1024 * 1024, (elapsed_s, peak_bytes)


def test_a_request_over_the_byte_limit_is_refused_before_parsing() -> None:
    predictor = Predictor(AppConfig(limits={"max_request_bytes": 1000}), StaticBackend())
    predictor.reconfigure(LiveConfig())
    error = _error(grpc_api.predict, _request(IMAGES), predictor)
    assert error.code is StatusCode.RESOURCE_EXHAUSTED and "the limit is 1000" in error.message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_get_a_clean_status_on_every_method(raw: bytes) -> None:
    predictor = _predictor()
    for handler in (
        grpc_api.predict,
        grpc_api.get_model_metadata,
        grpc_api.get_model_status,
        grpc_api.classify,
        grpc_api.regress,
        grpc_api.multi_inference,
    ):

        async def main(handler=handler):
            result = handler(predictor, raw)
            return await result if hasattr(result, "__await__") else result

        try:
            run_on_replica_loop(main())
        except ServingError as exc:
            assert exc.code is not StatusCode.INTERNAL, (handler.__name__, exc)


@st.composite
def predict_requests(draw) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = draw(st.sampled_from(["mnist", "", "other"]))
    choice = draw(st.sampled_from(["none", "version", "label"]))
    if choice == "version":
        request.model_spec.version.value = draw(st.integers(-3, 4))
    elif choice == "label":
        request.model_spec.version_label = draw(st.sampled_from(["stable", "x", ""]))
    request.model_spec.signature_name = draw(st.sampled_from(["", "serving_default", "predict_images", "x"]))
    for name in draw(st.lists(st.sampled_from(["images", "image_bytes", "x"]), max_size=2, unique=True)):
        tensor = request.inputs[name]
        tensor.dtype = draw(st.sampled_from([0, 1, 2, 4, 7, 9, 19, 777]))
        for size in draw(st.lists(st.integers(-1, 2**33), max_size=4)):
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = draw(st.binary(max_size=64))
        tensor.int_val.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)))
        tensor.float_val.extend(draw(st.lists(st.floats(width=32), max_size=4)))
        tensor.string_val.extend(draw(st.lists(st.binary(max_size=16), max_size=3)))
    request.output_filter.extend(draw(st.lists(st.sampled_from(["classes", "scores", "x"]), max_size=3)))
    return request.SerializeToString()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=predict_requests())
def test_structured_predict_requests_never_get_internal_and_stay_small(raw: bytes) -> None:
    predictor = _predictor(version_labels={"stable": 1})
    tracemalloc.start()
    try:

        async def main():
            return await grpc_api.predict(predictor, raw)

        run_on_replica_loop(main())
    except ServingError as exc:
        assert exc.code is not StatusCode.INTERNAL, exc
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak_bytes < 16 * 1024 * 1024  # at most max_request_bytes (8 MiB) decoded, plus answers


# -- metadata, status ------------------------------------------------------------------------------
def test_metadata_is_tf_servings_with_the_apps_own_signature() -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    response = _call(grpc_api.get_model_metadata, request)
    assert response.model_spec.version.value == 2 and not response.model_spec.signature_name
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {"serving_default", "predict_images", "predict_image_bytes"}
    images = signatures.signature_def["serving_default"].inputs["images"]
    assert (images.name, images.dtype, [d.size for d in images.tensor_shape.dim]) == (
        "serving_default_images:0",
        types_pb2.DT_UINT8,
        [-1, 28, 28],
    )
    request.ClearField("metadata_field")
    assert _error(grpc_api.get_model_metadata, request).message == (
        "GetModelMetadataRequest must specify at least one metadata_field"
    )
    request.metadata_field.append("foo")
    assert _error(grpc_api.get_model_metadata, request).message == "Metadata field foo is not supported"


def test_status_lists_versions_newest_first_with_failed_loads_and_ignores_labels() -> None:
    backend = StaticBackend(
        versions=(1, 2), states={3: VersionState("END", "DataLossError: truncated", "UNKNOWN")}
    )
    predictor = _predictor(backend)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version_label = "whatever"  # TF Serving ignores it here
    statuses = _call(grpc_api.get_model_status, request, predictor).model_version_status
    assert [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state)) for s in statuses] == [
        (3, "END"),
        (2, "AVAILABLE"),
        (1, "AVAILABLE"),
    ]
    assert (
        statuses[0].status.error_message == "DataLossError: truncated" and statuses[0].status.error_code == 2
    )
    request.model_spec.version.value = 9
    assert (
        _error(grpc_api.get_model_status, request, predictor).message
        == "Could not find version 9 of model mnist"
    )
    request.model_spec.name = "other"
    request.model_spec.ClearField("version")
    error = _error(grpc_api.get_model_status, request, predictor)
    assert (error.code, error.message) == (StatusCode.NOT_FOUND, "Could not find any versions of model other")


# -- Classify, Regress, MultiInference -------------------------------------------------------------
def test_classify_regress_and_multi_inference_answer_as_tf_serving_does_for_this_model() -> None:
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "mnist"
    error = _error(grpc_api.classify, classify)
    assert error.code is StatusCode.INVALID_ARGUMENT
    assert error.message.startswith("No classification inputs found in SignatureDef: inputs {")
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "mnist"
    assert _error(grpc_api.regress, regress).message == "Expected one output Tensor."
    regress.model_spec.signature_name = "x"
    assert _error(grpc_api.regress, regress).message == "No signature was found with the name: x"
    multi = inference_pb2.MultiInferenceRequest()
    assert _error(grpc_api.multi_inference, multi).message == "ModelSpec has no name specified."
    task = multi.tasks.add(method_name="tensorflow/serving/predict")
    task.model_spec.name = "mnist"
    error = _error(grpc_api.multi_inference, multi)
    assert (error.code, error.message) == (
        StatusCode.UNIMPLEMENTED,
        "Unsupported signature method_name: tensorflow/serving/predict",
    )


def test_batched_answers_are_split_back_per_request() -> None:
    predictor = _predictor(max_batch_size=8, batch_wait_timeout_s=0.05)
    backend = predictor.backend

    async def main():
        import asyncio

        requests = [_request(IMAGES[i : i + 1]).SerializeToString() for i in range(4)]
        return await asyncio.gather(*(grpc_api.predict(predictor, r) for r in requests))

    responses = run_on_replica_loop(main())
    expected = fake_probabilities(IMAGES).argmax(1).tolist()
    assert [to_ndarray(r.outputs["classes"]).tolist() for r in responses] == [[c] for c in expected]
    assert len(backend.calls) < 4  # batched


def _png_request(count: int) -> predict_pb2.PredictRequest:
    import io

    from PIL import Image

    from training.data import load_mnist

    buffer = io.BytesIO()
    Image.fromarray(load_mnist().test.images[0]).save(buffer, format="PNG")
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "mnist", "predict_image_bytes"
    request.inputs["image_bytes"].CopyFrom(from_ndarray(np.array([buffer.getvalue()] * count, dtype=object)))
    return request


def test_image_decoding_has_its_own_bounded_threads(monkeypatch) -> None:
    """Slow decodes hold only the decoder thread: tensor requests still run, and past
    max_pending_decodes further image-bytes requests are refused at once."""
    import asyncio

    from ray_app import preprocessing

    real = preprocessing.preprocess_bytes

    def slow(data, **limits):
        time.sleep(0.5)  # a large image taking long to decode
        return real(data, **limits)

    monkeypatch.setattr(preprocessing, "preprocess_bytes", slow)
    predictor = Predictor(AppConfig(limits={"decode_threads": 1, "max_pending_decodes": 2}), StaticBackend())
    predictor.reconfigure(LiveConfig())

    async def scenario():
        decoding = [
            asyncio.ensure_future(grpc_api.predict(predictor, _png_request(1).SerializeToString()))
            for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        tensors = await grpc_api.predict(predictor, _request(IMAGES).SerializeToString())
        tensor_s = time.perf_counter() - started
        with pytest.raises(ServingError) as refused:
            await grpc_api.predict(predictor, _png_request(1).SerializeToString())
        await asyncio.gather(*decoding)
        return tensors, tensor_s, refused.value

    tensors, tensor_s, refused = run_on_replica_loop(scenario())
    assert len(tensors.outputs["classes"].int64_val) == 4 and tensor_s < 0.3  # not behind the decodes
    assert refused.code is StatusCode.RESOURCE_EXHAUSTED and refused.limit == "max_pending_decodes"
    predictor.close()


def test_an_unload_after_grouping_never_answers_a_pinned_request_with_another_version() -> None:
    """Version 1 is gone by the time its group runs: the unpinned item moves to the latest (2),
    the pinned one gets NOT_FOUND, and neither is answered by the other's version."""
    import asyncio

    from ray_app.batcher import Batcher, BatchItem

    backend = StaticBackend(versions=(2,))
    images = np.zeros((1, 28, 28), np.uint8)
    pinned = BatchItem(1, True, "serving_default", {"images": images}, ())
    unpinned = BatchItem(1, False, "serving_default", {"images": images}, ())
    first, second = asyncio.run(Batcher(backend, backend_timeout_s=30).run_group([pinned, unpinned]))
    assert isinstance(first, ServingError) and first.code == StatusCode.NOT_FOUND
    assert unpinned.version == 2 and set(second) == {"probabilities", "classes"}
    assert backend.calls == [(2, "serving_default", 1)]
