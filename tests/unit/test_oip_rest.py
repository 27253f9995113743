"""ray_app.oip_rest without Ray or TensorFlow: the /v2 routes, JSON and binary tensors as tritonclient.http
encodes and decodes them (its own request/response codecs, no network), limits before decoding, fuzzing."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_app import oip_rest
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from tests.unit.conftest import ArrivedBody, run_on_replica_loop
from tests.unit.static_backend import StaticBackend, fake_probabilities

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGES = (np.arange(2 * 28 * 28) % 256).astype(np.uint8).reshape(2, 28, 28)
CLIENT = triton_http.InferenceServerClient


def _predictor(backend: StaticBackend | None = None, limits: dict | None = None, **live) -> Predictor:
    config = AppConfig(limits=limits or {})
    predictor = Predictor(config, backend or StaticBackend(versions=(1, 2)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig(**live))
    return predictor


def _call(
    method: str, path: str, body: bytes = b"", headers: dict | None = None, predictor=None, stream=None
) -> oip_rest.Answer:
    headers = {"content-length": str(len(body)), **{k.lower(): v for k, v in (headers or {}).items()}}
    stream = stream or ArrivedBody(body)
    return run_on_replica_loop(oip_rest.handle(predictor or _predictor(), method, path, headers, stream))


def _error(answer: oip_rest.Answer) -> tuple[int, str]:
    return answer.status, json.loads(answer.body)["error"]


def _client_infer(path: str = "/v2/models/mnist/infer", binary: bool = True, outputs=None, **kwargs):
    request_input = triton_http.InferInput("images", list(IMAGES.shape), "UINT8")
    request_input.set_data_from_numpy(IMAGES, binary_data=binary)
    body, json_size = CLIENT.generate_request_body([request_input], outputs=outputs, **kwargs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    answer = _call("POST", path, body, headers, kwargs.pop("predictor", None))
    assert answer.status == 200, answer.body
    length = answer.headers.get("Inference-Header-Content-Length")
    return answer, CLIENT.parse_response_body(answer.body, header_length=int(length) if length else None)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclients_own_request_bodies_are_answered(binary: bool) -> None:
    answer, result = _client_infer(binary=binary, request_id="q1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mnist", "2", "q1")
    assert np.array_equal(result.as_numpy("probabilities"), fake_probabilities(IMAGES))
    assert result.as_numpy("classes").tolist() == fake_probabilities(IMAGES).argmax(axis=1).tolist()
    # no outputs named: tritonclient asks for binary_data_output, and gets binary sections
    assert answer.media_type == "application/octet-stream"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])


def test_requested_outputs_choose_json_or_binary_each() -> None:
    outputs = [
        triton_http.InferRequestedOutput("classes", binary_data=False),
        triton_http.InferRequestedOutput("probabilities", binary_data=True),
    ]
    answer, result = _client_infer(outputs=outputs)
    described = {o["name"]: o for o in result.get_response()["outputs"]}
    assert list(described) == ["classes", "probabilities"]
    assert described["classes"]["data"] == fake_probabilities(IMAGES).argmax(axis=1).tolist()
    assert described["probabilities"]["parameters"] == {"binary_data_size": 80}
    assert result.as_numpy("probabilities").shape == (2, 10)


def test_json_only_answers_are_plain_json() -> None:
    body = json.dumps(
        {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    )
    answer = _call("POST", "/v2/models/mnist/versions/1/infer", body.encode())
    assert answer.status == 200 and answer.media_type == "application/json" and not answer.headers
    document = json.loads(answer.body)
    assert document["model_version"] == "1" and [o["name"] for o in document["outputs"]] == [
        "classes",
        "probabilities",
    ]


def test_routes_health_and_metadata() -> None:
    empty = _predictor(StaticBackend(versions=()))
    assert _call("GET", "/v2/health/live").status == 200
    assert _call("GET", "/v2/health/ready").status == 200
    assert _call("GET", "/v2/health/ready", predictor=empty).status == 400
    assert _call("GET", "/v2/health/live", predictor=empty).status == 200
    assert _call("GET", "/v2/models/mnist/ready").status == 200
    assert _call("GET", "/v2/models/mnist/versions/2/ready").status == 200
    assert _error(_call("GET", "/v2/models/mnist/versions/7/ready")) == (
        404,
        "'mnist' version 7 is not found",
    )
    assert _error(_call("GET", "/v2/models/nope/ready"))[0] == 404
    assert _error(_call("GET", "/v2/models/mnist/versions/x/ready"))[0] == 400
    metadata = json.loads(_call("GET", "/v2/models/mnist.predict_images/versions/1").body)
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]
    assert json.loads(_call("GET", "/v2").body)["extensions"] == ["binary_tensor_data"]
    assert _error(_call("GET", "/v2/models/nope")) == (404, "Request for unknown model: 'nope' is not found")
    assert _error(_call("GET", "/v2/repository/index")) == (404, "Not Found")
    assert _error(_call("DELETE", "/v2/models/mnist")) == (405, "Method Not Allowed")
    assert _error(_call("GET", "/v2/models/mnist/infer")) == (405, "Method Not Allowed")


def test_an_unknown_model_is_answered_before_the_body_is_read() -> None:
    stream = ArrivedBody(b"{}")
    answer = _call("POST", "/v2/models/other/infer", b"{}", stream=stream)
    assert answer.status == 404 and not stream.read


def test_bodies_over_the_limit_are_refused_before_reading() -> None:
    stream = ArrivedBody(b"x")
    answer = _call(
        "POST",
        "/v2/models/mnist/infer",
        headers={"content-length": "2000"},
        stream=stream,
        predictor=_predictor(limits={"max_request_bytes": 1000}),
    )
    assert answer.status == 429 and not stream.read


@pytest.mark.parametrize(
    "header, tail, status, text",
    [
        ({"binary_data_size": 2 * 784}, b"", 200, None),
        ({"binary_data_size": 2 * 784}, b"!", 400, "unexpected additional input data for model 'mnist'"),
        ({"binary_data_size": 2 * 784 + 5}, b"", 400, "expecting 5 additional bytes"),
        ({"binary_data_size": 2**62}, b"", 400, "unexpected size for input 'images'"),
        ({"binary_data_size": -1}, b"", 400, "Unable to parse 'binary_data_size'"),
        ({"binary_data_size": 10}, b"", 400, "unexpected additional input data"),  # sections first
    ],
)
def test_binary_sections_are_checked_against_the_bytes_received(header, tail, status, text) -> None:
    document = {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28], "parameters": header}]
    }
    text_bytes = json.dumps(document).encode()
    body = text_bytes + IMAGES.tobytes() + tail
    answer = _call(
        "POST", "/v2/models/mnist/infer", body, {"Inference-Header-Content-Length": str(len(text_bytes))}
    )
    assert answer.status == status, answer.body
    if text:
        assert text in json.loads(answer.body)["error"]


@pytest.mark.parametrize(
    "body, headers, status, text",
    [
        (b"{", {}, 400, "failed to parse the request JSON buffer"),
        (b"[]", {}, 400, "expected a JSON object"),
        (b"{}", {}, 400, "Unable to parse 'inputs': missing"),
        (b'{"inputs": {}}', {}, 400, "Unable to parse 'inputs'"),
        (
            b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28]}]}',
            {},
            400,
            "must specify one of",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, -28], "data": []}]}',
            {},
            400,
            "invalid dimensions",
        ),
        (
            b'{"inputs": [], "outputs": [{"name": "classes", "parameters": {"classification": 3}}]}',
            {},
            501,
            "classification",
        ),
        (
            b"{}",
            {"Inference-Header-Content-Length": "x"},
            400,
            "Unable to parse Inference-Header-Content-Length",
        ),
        (
            b"{}",
            {"Inference-Header-Content-Length": "3"},
            400,
            "inference header size should be in range (0, 2)",
        ),
        (b"x" * 2000, {}, 429, "the limit is 1000"),
    ],
)
def test_malformed_bodies(body: bytes, headers: dict, status: int, text: str) -> None:
    answer = _call(
        "POST", "/v2/models/mnist/infer", body, headers, _predictor(limits={"max_request_bytes": 1000})
    )
    assert answer.status == status, answer.body
    assert text in json.loads(answer.body)["error"]


_TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["images", "image_bytes", "x"]),
        "datatype": st.sampled_from(["UINT8", "FP32", "BYTES", "BOOL", "FP16", "nope"]),
        "shape": st.lists(st.integers(-1, 2**40), max_size=4),
    },
    optional={
        "data": st.recursive(
            st.integers(-300, 300) | st.floats() | st.text(max_size=3) | st.booleans(),
            st.lists,
            max_leaves=30,
        ),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64)}),
    },
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        [
            "/v2/models/mnist/infer",
            "/v2/models/mnist.predict_image_bytes/infer",
            "/v2/models/mnist.predict_images/versions/1/infer",
        ]
    ),
    inputs=st.lists(_TENSOR, max_size=2),
    outputs=st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["classes", "scores", "x"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
        ),
        max_size=2,
    ),
    tail=st.binary(max_size=64),
    split=st.one_of(st.none(), st.integers(-2, 4)),
)
def test_structured_bodies_never_get_a_500_and_stay_small(path, inputs, outputs, tail, split) -> None:
    header = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    headers = {} if split is None else {"Inference-Header-Content-Length": str(len(header) + split)}
    tracemalloc.start()
    try:
        answer = _call("POST", path, header + tail, headers)
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert answer.status != 500, answer.body
    assert peak_bytes < 16 * 1024 * 1024


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=256), path=st.text(max_size=30))
def test_arbitrary_bodies_and_paths_never_get_a_500(body: bytes, path: str) -> None:
    for method in ("GET", "POST"):
        assert _call(method, "/v2" + path, body).status != 500
        assert _call(method, "/v2/models/mnist/infer", body).status != 500


def test_lone_surrogates_in_a_request_are_answered_in_valid_json() -> None:
    body = (
        b'{"id": "\\ud800", "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
        b'"data": ["\\udfff"]}]}'
    )
    answer = _call("POST", "/v2/models/mnist.predict_image_bytes/infer", body)
    assert answer.status == 400 and "image 0:" in json.loads(answer.body.decode("utf-8"))["error"]
    answer = _call("POST", "/v2/models/mnist/infer", b'{"inputs": [{"name": "\\ud800"}]}')
    assert answer.status == 400 and json.loads(answer.body.decode("utf-8"))["error"]
