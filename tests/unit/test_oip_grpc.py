"""ray_app.oip_grpc without Ray or TensorFlow: inference.GRPCInferenceService through the real predictor
and Serve's real batcher (a static backend), tritonclient's messages, hostile requests fuzzed."""

from __future__ import annotations

import random
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from ray_app import grpc_methods, oip_grpc
from ray_app.backends.base import VersionState
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol.status import ServingError, StatusCode
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend, fake_probabilities

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGES = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
EXPECTED = fake_probabilities(IMAGES).argmax(axis=1).tolist()
OIP_METHODS = [
    name for name, method in grpc_methods.METHODS.items() if method.protocol == grpc_methods.OIP_GRPC
]


def _predictor(backend: StaticBackend | None = None, **live) -> Predictor:
    predictor = Predictor(AppConfig(), backend or StaticBackend(versions=(1, 2)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig(**live))
    return predictor


def _call(method: str, request, predictor: Predictor | None = None):
    predictor = predictor or _predictor()
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    return run_on_replica_loop(grpc_methods.METHODS[method].handle(predictor, raw, time.monotonic() + 30))


def _error(method: str, request, predictor: Predictor | None = None) -> ServingError:
    with pytest.raises(ServingError) as info:
        _call(method, request, predictor)
    return info.value


def _infer(images: np.ndarray = IMAGES, raw: bool = True, **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mnist", **fields)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request


def _classes(response) -> list[int]:
    names = [output.name for output in response.outputs]
    index = names.index("classes")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[index], "<i8").tolist()
    return list(response.outputs[index].contents.int64_contents)


def test_raw_request_gets_raw_answer_from_the_latest_version() -> None:
    response = _call("ModelInfer", _infer(id="req-7"))
    assert (response.model_name, response.model_version, response.id) == ("mnist", "2", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("classes", "INT64", [3]),
        ("probabilities", "FP32", [3, 10]),
    ]
    assert len(response.raw_output_contents) == 2 and _classes(response) == EXPECTED
    probabilities = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(3, 10)
    assert np.array_equal(probabilities, fake_probabilities(IMAGES))


def test_typed_request_gets_typed_answer_and_requested_outputs_only() -> None:
    request = _infer(raw=False)
    request.outputs.add(name="classes")
    response = _call("ModelInfer", request)
    assert not response.raw_output_contents and [o.name for o in response.outputs] == ["classes"]
    assert _classes(response) == EXPECTED


def test_versions_labels_and_the_image_bytes_model() -> None:
    predictor = _predictor(version_labels={"stable": 1})
    assert _call("ModelInfer", _infer(), predictor).model_version == "1"  # stable, as TF Serving's protocol
    assert _call("ModelInfer", _infer(model_version="2"), predictor).model_version == "2"
    assert _call("ModelInfer", _infer(model_version="stable"), predictor).model_version == "1"
    error = _error("ModelInfer", _infer(model_version="canary"), predictor)
    assert error.code is StatusCode.INVALID_ARGUMENT and "version labels ['stable']" in error.message
    error = _error("ModelInfer", _infer(model_version="3"), predictor)
    assert error.code is StatusCode.NOT_FOUND and error.message == "'mnist' version 3 is not found"
    metadata = _call("ModelMetadata", service_pb2.ModelMetadataRequest(name="mnist.predict_image_bytes"))
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image_bytes", "BYTES", [-1])]
    assert list(metadata.versions) == ["1", "2"] and metadata.platform == "tensorflow_savedmodel"
    for name in ("mnist.nope", "mnist.", "mnist.__saved_model_init_op", "other"):
        error = _error("ModelMetadata", service_pb2.ModelMetadataRequest(name=name))
        assert error.code is StatusCode.NOT_FOUND and f"'{name}' is not found" in error.message


def test_image_bytes_with_triton_length_prefixes_reach_the_decoder() -> None:
    request = service_pb2.ModelInferRequest(model_name="mnist.predict_image_bytes")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(serialize_byte_tensor(np.array([b"not", b"png"], dtype=object)).item())
    error = _error("ModelInfer", request)
    # the BYTES elements were split right: the decoder names the first one it could not read
    assert error.code is StatusCode.INVALID_ARGUMENT and error.message.startswith("image 0:")


def test_health_and_readiness() -> None:
    empty = StaticBackend(versions=())
    assert _call("ServerLive", service_pb2.ServerLiveRequest()).live
    assert _call("ServerReady", service_pb2.ServerReadyRequest()).ready
    assert not _call("ServerReady", service_pb2.ServerReadyRequest(), _predictor(empty)).ready
    assert _call("ModelReady", service_pb2.ModelReadyRequest(name="mnist", version="1")).ready
    failed = StaticBackend(
        versions=(1,), states={3: VersionState("END", "DataLossError: truncated", "UNKNOWN")}
    )
    assert not _call(
        "ModelReady", service_pb2.ModelReadyRequest(name="mnist", version="3"), _predictor(failed)
    ).ready
    for request, predictor, text in [  # as Triton: what it does not know is NOT_FOUND, not "not ready"
        (service_pb2.ModelReadyRequest(name="mnist", version="5"), None, "'mnist' version 5 is not found"),
        (service_pb2.ModelReadyRequest(name="mnist"), _predictor(empty), "'mnist' has no available versions"),
        (service_pb2.ModelReadyRequest(name="nope"), None, "Request for unknown model: 'nope' is not found"),
    ]:
        error = _error("ModelReady", request, predictor)
        assert error.code is StatusCode.NOT_FOUND and error.message == text
    error = _error("ModelReady", service_pb2.ModelReadyRequest(name="mnist", version="-1"))
    assert error.code is StatusCode.INVALID_ARGUMENT
    error = _error("ModelInfer", _infer(), _predictor(empty))
    assert error.code is StatusCode.NOT_FOUND and "has no available versions" in error.message


@pytest.mark.parametrize(
    "mutate, code, text",
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "INVALID_ARGUMENT", "expects 'UINT8'"),
        (lambda r: setattr(r.inputs[0], "datatype", "BF16"), "INVALID_ARGUMENT", "invalid datatype 'BF16'"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "unexpected inference input 'x'"),
        (lambda r: r.inputs.add(name="images", datatype="UINT8"), "INVALID_ARGUMENT", "already exists"),
        (
            lambda r: r.inputs[0].shape.__setitem__(2, 29),
            "INVALID_ARGUMENT",
            "Expected [-1,28,28], got [3,28,29]",
        ),
        (lambda r: r.inputs[0].shape.__setitem__(0, -3), "INVALID_ARGUMENT", "invalid dimensions"),
        (
            lambda r: r.raw_input_contents.append(b""),
            "INVALID_ARGUMENT",
            "expected 1 raw input contents, got 2",
        ),
        (lambda r: r.raw_input_contents.__setitem__(0, b"x"), "INVALID_ARGUMENT", "unexpected size 1"),
        (
            lambda r: r.inputs[0].contents.uint_contents.append(1),
            "INVALID_ARGUMENT",
            "contents field must not",
        ),
        (lambda r: r.outputs.add(name="scores"), "INVALID_ARGUMENT", "unexpected inference output 'scores'"),
        (
            lambda r: r.inputs[0].shape.__setitem__(0, 5000),
            "RESOURCE_EXHAUSTED",
            "5000 images in one request",
        ),
        (lambda r: setattr(r, "model_name", ""), "NOT_FOUND", "Request for unknown model: ''"),
    ],
)
def test_infer_errors(mutate, code: str, text: str) -> None:
    request = _infer()
    mutate(request)
    error = _error("ModelInfer", request)
    assert (error.code.value, text in error.message) == (code, True), error.message


def test_a_request_over_the_byte_limit_is_refused_before_parsing() -> None:
    predictor = Predictor(AppConfig(limits={"max_request_bytes": 1000}), StaticBackend())
    predictor.reconfigure(LiveConfig())
    error = _error("ModelInfer", _infer(), predictor)
    assert error.code is StatusCode.RESOURCE_EXHAUSTED and "the limit is 1000" in error.message


def test_huge_bytes_element_counts_are_refused_before_reading_them() -> None:
    request = service_pb2.ModelInferRequest(model_name="mnist.predict_image_bytes")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[10**9])
    request.raw_input_contents.append(b"")
    error = _error("ModelInfer", request)
    assert error.code is StatusCode.RESOURCE_EXHAUSTED and "1000000000 images" in error.message


def test_server_metadata() -> None:
    metadata = _call("ServerMetadata", service_pb2.ServerMetadataRequest())
    assert metadata.name == "mnist-ray" and list(metadata.extensions) == ["binary_tensor_data"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_get_a_clean_status_on_every_method(raw: bytes) -> None:
    predictor = _predictor()
    for method in OIP_METHODS:
        try:
            _call(method, raw, predictor)
        except ServingError as exc:
            assert exc.code is not StatusCode.INTERNAL, (method, exc)


@st.composite
def infer_requests(draw) -> bytes:
    request = service_pb2.ModelInferRequest()
    request.model_name = draw(
        st.sampled_from(["mnist", "mnist.predict_images", "mnist.predict_image_bytes", "x"])
    )
    request.model_version = draw(
        st.sampled_from(["", "1", "2", "3", "stable", "x", "0", "99999999999999999999"])
    )
    raw = draw(st.booleans())
    for name in draw(st.lists(st.sampled_from(["images", "image_bytes", "x"]), max_size=2)):
        tensor = request.inputs.add(name=name)
        tensor.datatype = draw(
            st.sampled_from(["UINT8", "FP32", "BYTES", "INT64", "FP16", "BOOL", "BF16", ""])
        )
        tensor.shape.extend(draw(st.lists(st.integers(-1, 2**40), max_size=4)))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)))
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=16), max_size=3)))
    for name in draw(st.lists(st.sampled_from(["classes", "scores", "probabilities", "x"]), max_size=3)):
        request.outputs.add(name=name)
    return request.SerializeToString()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=infer_requests())
def test_structured_infer_requests_never_get_internal_and_stay_small(raw: bytes) -> None:
    predictor = _predictor(version_labels={"stable": 1})
    tracemalloc.start()
    try:
        _call("ModelInfer", raw, predictor)
    except ServingError as exc:
        assert exc.code is not StatusCode.INTERNAL, exc
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak_bytes < 16 * 1024 * 1024


@pytest.mark.parametrize("first", ["tritonclient", "tf_serving"])
def test_tritonclients_and_tf_servings_protos_share_one_process(first: str) -> None:
    """Both sets of generated code register in protobuf's default pool, in either order, with ours."""
    imports = {
        "tritonclient": "from tritonclient.grpc import service_pb2",
        "tf_serving": "from tensorflow_serving.apis import predict_pb2 as stock; "
        "from ray_app.protocol.protos import predict_pb2",
    }
    second = "tf_serving" if first == "tritonclient" else "tritonclient"
    code = "; ".join(
        [
            imports[first],
            imports[second],
            "from google.protobuf import descriptor_pool",
            "pool = descriptor_pool.Default()",
            "assert pool.FindMessageTypeByName('inference.ModelInferRequest')",
            "assert pool.FindMessageTypeByName('tensorflow.serving.PredictRequest')",
            "assert predict_pb2.PredictRequest is stock.PredictRequest",
            "request = service_pb2.ModelInferRequest(model_name='m')",
            "assert service_pb2.ModelInferRequest.FromString(request.SerializeToString()).model_name == 'm'",
            "assert predict_pb2.PredictRequest(model_spec={'name': 'm'}).model_spec.name == 'm'",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_the_deployment_counts_oip_requests_under_their_own_protocol() -> None:
    from types import SimpleNamespace

    from starlette.requests import Request

    from ray_app.deployment import MnistServer

    server = object.__new__(MnistServer.func_or_class)
    recorded: list[tuple] = []
    server._metrics = SimpleNamespace(
        request=lambda *args: recorded.append(args), rejected=lambda limit: None
    )
    server._predictor = _predictor()
    server._auth = None  # tokens off, as in local.yaml
    codes: list = []
    context = SimpleNamespace(set_code=codes.append, set_details=lambda details: None)
    run_on_replica_loop(server.ModelInfer(_infer().SerializeToString(), context))
    run_on_replica_loop(
        server.ModelMetadata(service_pb2.ModelMetadataRequest(name="x").SerializeToString(), context)
    )

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v2/health/ready", "raw_path": b"/v2/health/ready"}
    answer = run_on_replica_loop(
        server.rest_v2(Request({**scope, "headers": [], "query_string": b""}, receive))
    )
    assert answer.status_code == 200 and [code.name for code in codes] == ["NOT_FOUND"]
    # (protocol, method, code, latency_ms, version, signature)
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in recorded] == [
        ("oip_grpc", "ModelInfer", "OK", 2, "serving_default"),
        ("oip_grpc", "ModelMetadata", "NOT_FOUND", None, ""),
        ("oip_rest", "server_ready", "OK", None, ""),
    ]


def test_the_benchmarks_oip_requests_are_answered_and_checked() -> None:
    from bench.loadgen import build_oip_requests, correct_oip

    requests, labels = build_oip_requests("mnist", 4, count=2)
    for request, expected in zip(requests, labels):
        response = _call("ModelInfer", request)
        images = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(4, 28, 28)
        predicted = fake_probabilities(images).argmax(axis=1)
        assert correct_oip(response, expected) == int(np.sum(predicted == expected))
        assert correct_oip(response, expected[:3]) is None  # an answer of the wrong size is malformed


def test_both_protocols_share_one_batch() -> None:
    """TF Serving's Predict and OIP ModelInfer requests in flight together run in one backend call,
    each answered with its own rows."""
    import asyncio

    from ray_app import grpc_api
    from ray_app.protocol.protos import predict_pb2
    from ray_app.protocol.tensors import from_ndarray, to_ndarray

    predictor = _predictor(max_batch_size=8, batch_wait_timeout_s=0.05)
    backend = predictor.backend
    tf_request = predict_pb2.PredictRequest()
    tf_request.model_spec.name = "mnist"
    tf_request.inputs["images"].CopyFrom(from_ndarray(IMAGES[:1], tensor_content=True))

    async def main():
        first = asyncio.ensure_future(oip_grpc.model_infer(predictor, _infer(IMAGES[:1]).SerializeToString()))
        await asyncio.sleep(0)  # in flight: what comes next waits for a batch
        rest = await asyncio.gather(
            grpc_api.predict(predictor, tf_request.SerializeToString()),
            oip_grpc.model_infer(predictor, _infer(IMAGES[1:]).SerializeToString()),
        )
        return [await first, *rest]

    alone, tf_response, oip_response = run_on_replica_loop(main())
    assert [size for _, _, size in backend.calls] == [1, 3]  # the lone one at once, then one mixed batch
    assert to_ndarray(tf_response.outputs["classes"]).tolist() == EXPECTED[:1]
    assert _classes(oip_response) == EXPECTED[1:] and _classes(alone) == EXPECTED[:1]
