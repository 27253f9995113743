"""ray_app.rest_api and the REST body reader without Ray: TF Serving's URLs, JSON rules, number
rendering and error texts; hostile bodies refused cheaply."""

from __future__ import annotations

import json
import random
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from ray_app import rest_api, rest_bodies
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import InferenceResult, Predictor
from ray_app.protocol.status import ServingError, StatusCode
from ray_app.request_body import read_body
from ray_app.rest_bodies import format_float
from ray_app.rest_routes import Route, route
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend, fake_probabilities

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGES = (np.arange(2 * 28 * 28) % 256).astype(np.uint8).reshape(2, 28, 28)


def _predictor(**limits) -> Predictor:
    predictor = Predictor(AppConfig(limits=limits), StaticBackend(versions=(1, 2)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig(version_labels={"stable": 1}))
    return predictor


def _predict(body: bytes | dict, where: Route | None = None, predictor: Predictor | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return run_on_replica_loop(
        rest_api.predict(predictor or _predictor(), where or Route("predict", "mnist"), raw)
    )


def _error(body: bytes | dict, where: Route | None = None) -> ServingError:
    with pytest.raises(ServingError) as info:
        _predict(body, where)
    return info.value


# -- URLs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/models/mnist:predict", Route("predict", "mnist")),
        ("POST", "/v1/models/mnist/versions/2:predict", Route("predict", "mnist", 2)),
        ("POST", "/v1/models/mnist/labels/a%20b:classify", Route("classify", "mnist", None, "a b")),
        ("POST", "/V1/MODELS/mnist:regress", Route("regress", "mnist")),
        ("GET", "/v1/models/mnist", Route("status", "mnist")),
        ("GET", "/v1/models/mnist/versions/3", Route("status", "mnist", 3)),
        ("GET", "/v1/models/mnist/labels/stable/metadata", Route("metadata", "mnist", None, "stable")),
        (
            "GET",
            "/v1/models/mnist/METADATA",
            Route("status", "mnist"),
        ),  # TF Serving compares case-sensitively
        ("GET", "/v1/models/mnist?x=1", Route("status", "mnist?x=1")),  # the query joins the name there too
    ],
)
def test_urls_are_matched_like_tf_serving(method: str, path: str, expected: Route) -> None:
    assert route(method, path) == expected


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("POST", "/v1/models/mnist:predict?x=1", "Malformed request: POST /v1/models/mnist:predict?x=1"),
        ("POST", "/v1/models/mnist:PREDICT", "Malformed request: POST /v1/models/mnist:PREDICT"),
        ("PUT", "/v1/models/mnist", "Malformed request: PUT /v1/models/mnist"),
        ("GET", "/v1/models/mnist:predict", "Malformed request: GET /v1/models/mnist:predict"),
        (
            "POST",
            "/v1/models/mnist/versions/x:predict",
            "Malformed request: POST /v1/models/mnist/versions/x:predict",
        ),
        ("GET", "/v1/models", "Missing model name in request."),
        (
            "GET",
            "/v1/models/m/versions/99999999999999999999",
            "Failed to convert version: 99999999999999999999 to numeric.",
        ),
        (  # past int()'s 4,300-digit limit: still a clean 400, the echo cut short
            "GET",
            "/v1/models/m/versions/" + "9" * 5000,
            "Failed to convert version: " + "9" * 40 + " to numeric.",
        ),
    ],
)
def test_other_urls_are_tf_servings_400s(method: str, path: str, message: str) -> None:
    with pytest.raises(ServingError) as info:
        route(method, path)
    assert (info.value.code, info.value.message) == (StatusCode.INVALID_ARGUMENT, message)


# -- predict ----------------------------------------------------------------------------------------
def test_row_and_columnar_answers_with_tf_servings_numbers() -> None:
    text, version, _ = _predict({"instances": IMAGES.tolist()})
    rows = json.loads(text)["predictions"]
    assert version == 1  # the "stable" label takes unpinned traffic
    assert [row["classes"] for row in rows] == fake_probabilities(IMAGES).argmax(1).tolist()
    assert "0.91," in text and "0.01," in text  # float32 0.91 rendered as TF Serving does, not 0.9100000262
    flat = (IMAGES.reshape(2, 784) / 255).tolist()
    text, _, _ = _predict({"signature_name": "predict_images", "inputs": flat}, Route("predict", "mnist", 1))
    assert np.asarray(json.loads(text)["outputs"]).shape == (2, 10)  # one output: the bare tensor


def test_single_output_rows_are_bare_values() -> None:
    flat = (IMAGES.reshape(2, 784) / 255).tolist()
    text, _, _ = _predict({"signature_name": "predict_images", "instances": flat})
    assert np.asarray(json.loads(text)["predictions"]).shape == (2, 10)


@pytest.mark.parametrize(
    ("value", "double", "text"),
    [
        (0.2, False, "0.2"),
        (1.0, False, "1.0"),
        (3.14159274, False, "3.14159274"),
        (1e6, False, "1e+06"),
        (1234567.0, False, "1234567.0"),
        (-0.0, False, "-0.0"),
        (float("nan"), False, "NaN"),
        (float("-inf"), True, "-Infinity"),
        (0.1, True, "0.1"),
        (1 / 3, True, "0.33333333333333331"),
    ],
)
def test_floats_are_rendered_as_tf_serving_renders_them(value: float, double: bool, text: str) -> None:
    stored = value if double else float(np.float32(value))
    assert format_float(stored, double) == text


def test_string_outputs_are_b64_only_when_named_bytes() -> None:
    result = InferenceResult(
        "mnist",
        1,
        "s",
        {"image_bytes": np.array([b"\xff"], dtype=object), "label": np.array([b"ok"], dtype=object)},
    )
    assert json.loads(rest_bodies.to_json(result.outputs, rows=True)) == {
        "predictions": [{"image_bytes": {"b64": "/w=="}, "label": "ok"}]
    }


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", StatusCode.INVALID_ARGUMENT, "JSON Parse error: The document is empty"),
        (b"{not json", StatusCode.INVALID_ARGUMENT, "JSON Parse error: Missing a name for object member. at offset: 1"),
        (b'{"a": 1 "b"}', StatusCode.INVALID_ARGUMENT, "JSON Parse error: Missing a comma or '}' after an object member. at offset: 8"),
        (b"[1 2]", StatusCode.INVALID_ARGUMENT, "JSON Parse error: Missing a comma or ']' after an array element. at offset: 3"),
        (b"{} x", StatusCode.INVALID_ARGUMENT, "JSON Parse error: The document root must not be followed by other values. at offset: 3"),
        (b"[1]", StatusCode.INVALID_ARGUMENT, "JSON Value: [1] Is not object"),
        ({"instances": 1, "inputs": 1}, StatusCode.INVALID_ARGUMENT, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "),
        ({"instances": 1}, StatusCode.INVALID_ARGUMENT, "Excepting 'instances' to be an list/array"),
        ({"instances": []}, StatusCode.INVALID_ARGUMENT, "No values in 'instances' array"),
        ({}, StatusCode.INVALID_ARGUMENT, "Missing 'inputs' or 'instances' key"),
        ({"signature_name": 5, "instances": [1]}, StatusCode.INVALID_ARGUMENT, "'signature_name' key must be a string value."),
        ({"signature_name": "x", "instances": [1]}, StatusCode.INVALID_ARGUMENT, 'Serving signature name: "x" not found in signature def'),
        ({"instances": [{"a": 1}]}, StatusCode.INVALID_ARGUMENT, "Failed to process element: 0 of 'instances' list. JSON object: {\"a\":1} keys must be equal to: images"),
        ({"instances": [np.full((28, 28), 0.5).tolist()]}, StatusCode.INVALID_ARGUMENT, "JSON Value: 0.5 Type: Number is not of expected type: uint8"),
        ({"instances": [[["x"] * 28] * 28]}, StatusCode.INVALID_ARGUMENT, 'JSON Value: "x" Type: String is not of expected type: uint8'),
        ({"instances": [np.zeros((28, 28)).tolist(), [[0]]]}, StatusCode.INVALID_ARGUMENT, "Expecting shape [28,28] but got: [1,1]"),
        ({"instances": [np.zeros((20, 28), int).tolist()]}, StatusCode.INVALID_ARGUMENT, "has shape [1, 20, 28], expected uint8[?,28,28]"),
        ({"signature_name": "predict_image_bytes", "instances": [{"b64": "!!"}]}, StatusCode.INVALID_ARGUMENT, "Unable to base64 decode"),
        ({"signature_name": "predict_image_bytes", "inputs": [{"b64": 1}]}, StatusCode.INVALID_ARGUMENT, "not formatted correctly for base64 data"),
        ({"signature_name": "predict_images", "inputs": [[16777217] * 784]}, StatusCode.INVALID_ARGUMENT, "Cannot convert JSON value: 16777217 to float without loss of precision."),
    ],
)  # fmt: skip
def test_request_errors_are_tf_servings(body, code, message) -> None:
    error = _error(body)
    assert error.code is code and message in error.message, error.message


def test_model_version_and_label_errors() -> None:
    assert _error({"instances": [1]}, Route("predict", "other")).message == (
        "Servable not found for request: Latest(other)"
    )
    assert _error({"instances": [1]}, Route("predict", "mnist", 5)).code is StatusCode.NOT_FOUND
    assert _error({"instances": [1]}, Route("predict", "mnist", None, "gold")).message == (
        "Unrecognized servable version label: gold"
    )


def test_a_malformed_body_is_reported_before_an_unknown_model() -> None:
    """TF Serving asks for the model's signatures (``get_tensorinfo_map``) only once the document
    is parsed and names its signature, so a malformed body to an unknown model gets the JSON error."""
    assert _error(b"{not json", Route("predict", "other")).message.startswith("JSON Parse error")
    assert _error(b"[1]", Route("predict", "mnist", 5)).message == "JSON Value: [1] Is not object"
    assert _error({"instances": [1]}, Route("predict", "mnist", 5)).code is StatusCode.NOT_FOUND


def test_status_and_metadata_json_as_tf_serving_writes_them() -> None:
    status = json.loads(rest_api.status(_predictor(), Route("status", "mnist", 2)))
    assert status == {
        "model_version_status": [
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    metadata = json.loads(rest_api.metadata(_predictor(), Route("metadata", "mnist", None, "stable")))
    assert metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    images = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["images"]
    assert images == {
        "dtype": "DT_UINT8",
        "tensor_shape": {
            "dim": [{"size": "-1", "name": ""}, {"size": "28", "name": ""}, {"size": "28", "name": ""}],
            "unknown_rank": False,
        },
        "name": "serving_default_images:0",
    }


# -- hostile bodies ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "composites", "code", "message"),
    [
        (100, 65_536, StatusCode.INVALID_ARGUMENT, "has shape [1, 1, 1,"),  # outline vs signature first
        (100_000, 65_536, StatusCode.RESOURCE_EXHAUSTED, "max_json_composites"),  # counted before parsing
        (100_000, 10**6, StatusCode.INVALID_ARGUMENT, "JSON Parse error: the document nests too deep"),
    ],
)
def test_deeply_nested_json_is_a_quick_clean_answer_not_a_crash(depth, composites, code, message) -> None:
    predictor = _predictor(max_json_composites=composites)
    nested = b"[" * depth + b"]" * depth
    for body in (b'{"instances": ' + nested + b"}", b'{"x": ' + nested + b', "instances": [1]}', nested):
        started = time.perf_counter()
        with pytest.raises(ServingError) as info:
            _predict(body, predictor=predictor)
        assert info.value.code is code and time.perf_counter() - started < 1.0
    with pytest.raises(ServingError) as info:
        _predict(b'{"instances": ' + nested + b"}", predictor=predictor)
    assert message in info.value.message


def _request(headers: dict[str, str], chunks: list[bytes]) -> tuple[Request, list[int]]:
    received = []

    async def receive():
        received.append(1)
        body = chunks[len(received) - 1] if len(received) <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": len(received) < len(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/models/mnist:predict",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), received


def test_a_declared_content_length_over_the_limit_is_refused_before_reading() -> None:
    request, received = _request({"content-length": str(10**12)}, [b"x"])
    with pytest.raises(ServingError) as info:
        run_on_replica_loop(read_body(request.headers, request.stream(), max_bytes=1000))
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED and received == []


def test_a_chunked_body_is_read_up_to_the_limit_only() -> None:
    request, received = _request({}, [b"x" * 600] * 100)
    with pytest.raises(ServingError, match="over the limit of 1000 bytes"):
        run_on_replica_loop(read_body(request.headers, request.stream(), max_bytes=1000))
    assert len(received) == 2


def test_big_legal_json_costs_memory_in_proportion_to_its_size() -> None:
    body = json.dumps({"instances": np.zeros((1024, 28, 28), int).tolist()}).encode()  # ~1.6 MB
    tracemalloc.start()
    started = time.perf_counter()
    try:
        _predict(body)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 10
    assert peak_bytes < 80 * len(body), peak_bytes  # Python's JSON objects: tens of bytes per number


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)


@st.composite
def bodies(draw) -> dict:
    body = draw(
        st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name", "x"]), _JSON, max_size=3)
    )
    if draw(st.booleans()):
        body["signature_name"] = draw(
            st.sampled_from(["predict_images", "predict_image_bytes", "serving_default"])
        )
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_any_json_body_gets_an_answer_or_a_clean_status(body: dict) -> None:
    try:
        _predict(json.dumps(body).encode())
    except ServingError as exc:
        assert exc.code is not StatusCode.INTERNAL, exc


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=256))
def test_any_bytes_as_a_body_get_a_clean_status(raw: bytes) -> None:
    try:
        _predict(raw)
    except ServingError as exc:
        assert exc.code is not StatusCode.INTERNAL, exc
