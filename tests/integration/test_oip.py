"""The Open Inference Protocol (KServe v2 / Triton) on the app's own ports, with the real clients.

One local Serve for the module (serve_configs/local.yaml's deployment, one replica, label
``stable`` -> 1), the untrained-for-long model the other integration modules share
(``trained_export``). ``tritonclient.grpc`` and ``tritonclient.http`` infer with raw and JSON
tensors, read binary outputs, metadata and readiness, and see the errors' codes; the same
images classified through TF Serving's protocol and through both OIP transports give the same
classes. ``CASES`` is the conformance table of docs/oip.md: each case, our answer, and the spec
section or Triton source file it follows.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.tensors import from_ndarray, to_ndarray
from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEST = load_mnist().test
SAMPLES = json.loads((REPO / "data" / "samples.json").read_text())
TIMEOUT_S = 30
ACCURACY_CHUNK = 500  # images per request


@pytest.fixture(scope="module")
def app(tmp_path_factory, trained_export):
    store = tmp_path_factory.mktemp("store") / "mnist"
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        run_local_app(store, user_config={"version_labels": {"stable": 1}}, num_replicas=1)
        channel = grpc.insecure_channel(ports.grpc_address)
        grpc_client = triton_grpc.InferenceServerClient(ports.grpc_address)
        http_client = triton_http.InferenceServerClient(
            f"127.0.0.1:{ports.http_port}", network_timeout=TIMEOUT_S
        )
        yield {
            "channel": channel,
            "stub": service_pb2_grpc.GRPCInferenceServiceStub(channel),
            "grpc": grpc_client,
            "http": http_client,
            "url": ports.http,
            "grpc_address": ports.grpc_address,
        }
        grpc_client.close()
        http_client.close()
        channel.close()


def _png(name: str) -> bytes:
    return (REPO / "data" / name).read_bytes()


# -- the real clients ----------------------------------------------------------------------------------
def test_tritonclient_grpc_health_metadata_and_raw_infer(app):
    client = app["grpc"]
    assert client.is_server_live(client_timeout=TIMEOUT_S) and client.is_server_ready(
        client_timeout=TIMEOUT_S
    )
    assert client.is_model_ready("mnist", client_timeout=TIMEOUT_S)
    with pytest.raises(InferenceServerException, match="unknown model"):  # as Triton answers
        client.is_model_ready("nope", client_timeout=TIMEOUT_S)
    metadata = client.get_model_metadata("mnist", as_json=True, client_timeout=TIMEOUT_S)
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "28", "28"]}]
    images = TEST.images[:4]
    request_input = triton_grpc.InferInput("images", list(images.shape), "UINT8")
    request_input.set_data_from_numpy(images)
    result = client.infer(
        "mnist",
        [request_input],
        outputs=[triton_grpc.InferRequestedOutput("classes")],
        request_id="r1",
        client_timeout=TIMEOUT_S,
    )
    response = result.get_response()
    assert (response.model_version, response.id) == ("1", "r1")
    assert [output.name for output in response.outputs] == ["classes"]  # requested outputs honoured
    assert result.as_numpy("classes").tolist() == TEST.labels[:4].tolist()


def test_tritonclient_grpc_sends_png_bytes_to_the_image_bytes_model(app):
    names = sorted(SAMPLES)
    request_input = triton_grpc.InferInput("image_bytes", [len(names)], "BYTES")
    request_input.set_data_from_numpy(np.array([_png(n) for n in names], dtype=object))
    result = app["grpc"].infer("mnist.predict_image_bytes", [request_input], client_timeout=TIMEOUT_S)
    assert np.mean(result.as_numpy("classes") == np.array([SAMPLES[n] for n in names])) >= 0.8
    metadata = app["grpc"].get_model_metadata("mnist.predict_image_bytes", as_json=True)
    assert metadata["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": ["-1"]}]


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_json_and_binary_tensors(app, binary):
    client = app["http"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    images = TEST.images[:3]
    request_input = triton_http.InferInput("images", list(images.shape), "UINT8")
    request_input.set_data_from_numpy(images, binary_data=binary)
    outputs = [
        triton_http.InferRequestedOutput("probabilities", binary_data=binary),
        triton_http.InferRequestedOutput("classes", binary_data=binary),
    ]
    result = client.infer("mnist", [request_input], outputs=outputs, model_version="stable")
    response = result.get_response()
    assert response["model_version"] == "1"
    assert all(("parameters" in o) == binary for o in response["outputs"])  # binary_data_size or data
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    assert result.as_numpy("classes").tolist() == probabilities.argmax(axis=1).tolist()
    assert result.as_numpy("classes").tolist() == TEST.labels[:3].tolist()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


def test_tritonclient_sees_the_error_codes(app):
    request_input = triton_grpc.InferInput("images", [1, 28, 28], "FP32")
    request_input.set_data_from_numpy(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException) as info:
        app["grpc"].infer("mnist", [request_input], client_timeout=TIMEOUT_S)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "expects 'UINT8'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        app["grpc"].get_model_metadata("nope", client_timeout=TIMEOUT_S)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        app["http"].get_model_metadata("mnist", model_version="9")
    assert info.value.status() == "404" and "version 9 is not found" in info.value.message()


def test_tritonclient_classifies_the_test_set_as_tf_servings_protocol_does(app):
    """All 10,000 test images, the same model, three protocols: the same classes, so the same accuracy."""
    predict = app["channel"].unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=predict_pb2.PredictRequest.SerializeToString,
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )
    by_protocol: dict[str, list[int]] = {"tf_serving": [], "oip_grpc": [], "oip_http": []}
    for start in range(0, len(TEST.images), ACCURACY_CHUNK):
        images = TEST.images[start : start + ACCURACY_CHUNK]
        tf_request = predict_pb2.PredictRequest()
        tf_request.model_spec.name = "mnist"
        tf_request.inputs["images"].CopyFrom(from_ndarray(images, tensor_content=True))
        by_protocol["tf_serving"] += to_ndarray(
            predict(tf_request, timeout=TIMEOUT_S).outputs["classes"]
        ).tolist()
        grpc_input = triton_grpc.InferInput("images", list(images.shape), "UINT8")
        grpc_input.set_data_from_numpy(images)
        answer = app["grpc"].infer("mnist", [grpc_input], client_timeout=TIMEOUT_S)
        by_protocol["oip_grpc"] += answer.as_numpy("classes").tolist()
        http_input = triton_http.InferInput("images", list(images.shape), "UINT8")
        http_input.set_data_from_numpy(images, binary_data=True)
        by_protocol["oip_http"] += app["http"].infer("mnist", [http_input]).as_numpy("classes").tolist()
    accuracy = {
        name: float(np.mean(np.array(classes) == TEST.labels)) for name, classes in by_protocol.items()
    }
    print(f"10,000 test images: accuracy by protocol {accuracy}")
    assert len(by_protocol["tf_serving"]) == len(TEST.labels) == 10_000
    assert by_protocol["oip_grpc"] == by_protocol["tf_serving"], accuracy
    assert by_protocol["oip_http"] == by_protocol["tf_serving"], accuracy
    assert accuracy["tf_serving"] > 0.9, accuracy


def test_the_docs_example_runs_unchanged(app, capsys) -> None:
    """docs/oip.md's example, pointed at this deployment's gRPC port."""
    text = (REPO / "docs" / "oip.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example.replace("localhost:9000", app["grpc_address"]), "docs/oip.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and len(printed.strip("[]\n").split()) == 2, printed


def test_paths_outside_v1_and_v2_still_get_tf_servings_404_page(app) -> None:
    status, headers, body = _http("GET", "/v3/models/mnist")(app)
    assert (status, headers["content-type"]) == (404, "text/html; charset=ISO-8859-1")
    assert b"<TITLE>404 Not Found</TITLE>" in body


# -- the conformance table (docs/oip.md) --------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Any], Any]
    check: Callable[[Any], None]
    source: str  # the spec section or Triton source file it follows


def _rpc(method: str, request) -> Callable[[Any], Any]:
    def call(app):
        try:
            return getattr(app["stub"], method)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    return call


def _code(code: grpc.StatusCode, text: str = "") -> Callable[[Any], None]:
    def check(answer) -> None:
        assert isinstance(answer, tuple) and answer[0] == code, answer
        assert text in answer[1], answer

    return check


def _infer_request(images=None, name="mnist", version="", raw=True, **extra) -> service_pb2.ModelInferRequest:
    images = TEST.images[:2] if images is None else images
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version, **extra)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request


def _raw_classes(answer) -> None:
    assert answer.model_version == "1" and len(answer.raw_output_contents) == len(answer.outputs) == 2
    index = [o.name for o in answer.outputs].index("classes")
    assert np.frombuffer(answer.raw_output_contents[index], "<i8").tolist() == TEST.labels[:2].tolist()


def _typed_classes(answer) -> None:
    assert not answer.raw_output_contents
    classes = next(o for o in answer.outputs if o.name == "classes")
    assert list(classes.contents.int64_contents) == TEST.labels[:2].tolist()


def _png_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mnist.predict_image_bytes")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[2])
    pngs = [_png("3.png"), _png("7.png")]
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in pngs))
    return request


def _two_decoded_images(answer) -> bool:
    """Both length-prefixed PNGs were split and decoded (the classes themselves are the model's)."""
    shapes = {o.name: list(o.shape) for o in answer.outputs}
    probabilities = np.frombuffer(answer.raw_output_contents[list(shapes).index("probabilities")], "<f4")
    return shapes == {"classes": [2], "probabilities": [2, 10]} and np.allclose(
        probabilities.reshape(2, 10).sum(axis=1), 1, atol=1e-3
    )


def _with(request, mutate):
    mutate(request)
    return request


def _ok(predicate: Callable[[Any], bool]) -> Callable[[Any], None]:
    def check(answer) -> None:
        assert not isinstance(answer, tuple), answer
        assert predicate(answer), answer

    return check


def _metadata_of(answer) -> dict:
    return {
        "name": answer.name,
        "inputs": [(t.name, t.datatype, list(t.shape)) for t in answer.inputs],
        "outputs": [(t.name, t.datatype, list(t.shape)) for t in answer.outputs],
    }


_HUGE = service_pb2.ModelInferRequest(model_name="mnist")
_HUGE.inputs.add(name="images", datatype="UINT8", shape=[2000, 28, 28])
_HUGE.raw_input_contents.append(b"x")

GRPC_CASES = [
    Case(
        "grpc ServerLive",
        _rpc("ServerLive", service_pb2.ServerLiveRequest()),
        _ok(lambda a: a.live),
        "spec: Health, server live",
    ),
    Case(
        "grpc ServerReady with a version loaded",
        _rpc("ServerReady", service_pb2.ServerReadyRequest()),
        _ok(lambda a: a.ready),
        "spec: Health, server ready",
    ),
    Case(
        "grpc ModelReady",
        _rpc("ModelReady", service_pb2.ModelReadyRequest(name="mnist", version="1")),
        _ok(lambda a: a.ready),
        "spec: Health, model ready",
    ),
    Case(
        "grpc ModelReady unknown model",
        _rpc("ModelReady", service_pb2.ModelReadyRequest(name="nope")),
        _code(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nope' is not found"),
        "Triton core src/tritonserver.cc TRITONSERVER_ServerModelIsReady (GetModel's error)",
    ),
    Case(
        "grpc ModelReady malformed version",
        _rpc("ModelReady", service_pb2.ModelReadyRequest(name="mnist", version="x")),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "failed to get model version"),
        "Triton src/common.cc GetModelVersionFromString",
    ),
    Case(
        "grpc ServerMetadata",
        _rpc("ServerMetadata", service_pb2.ServerMetadataRequest()),
        _ok(lambda a: a.name == "mnist-ray" and list(a.extensions) == ["binary_tensor_data"]),
        "spec: Server Metadata",
    ),
    Case(
        "grpc ModelMetadata: OIP datatypes, -1 for any size",
        _rpc("ModelMetadata", service_pb2.ModelMetadataRequest(name="mnist")),
        _ok(
            lambda a: (
                _metadata_of(a)
                == {
                    "name": "mnist",
                    "inputs": [("images", "UINT8", [-1, 28, 28])],
                    "outputs": [("classes", "INT64", [-1]), ("probabilities", "FP32", [-1, 10])],
                }
                and list(a.versions) == ["1"]
                and a.platform == "tensorflow_savedmodel"
            )
        ),
        "spec: Model Metadata; Triton platform names",
    ),
    Case(
        "grpc ModelMetadata of the image-bytes model: BYTES [-1]",
        _rpc("ModelMetadata", service_pb2.ModelMetadataRequest(name="mnist.predict_image_bytes")),
        _ok(lambda a: _metadata_of(a)["inputs"] == [("image_bytes", "BYTES", [-1])]),
        "spec: Tensor Data Types (BYTES)",
    ),
    Case(
        "grpc ModelMetadata unknown model",
        _rpc("ModelMetadata", service_pb2.ModelMetadataRequest(name="nope")),
        _code(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nope' is not found"),
        "Triton core src/model_repository_manager/model_repository_manager.cc",
    ),
    Case(
        "grpc ModelInfer raw in, raw out",
        _rpc("ModelInfer", _infer_request()),
        _raw_classes,
        "spec: grpc_service.proto raw_input_contents / raw_output_contents",
    ),
    Case(
        "grpc ModelInfer typed contents in, typed out",
        _rpc("ModelInfer", _infer_request(raw=False)),
        _typed_classes,
        "spec: InferTensorContents; KServe python/kserve/kserve/protocol/infer_type.py `_use_raw_outputs`",
    ),
    Case(
        "grpc ModelInfer requested outputs only",
        _rpc("ModelInfer", _with(_infer_request(), lambda r: r.outputs.add(name="classes"))),
        _ok(lambda a: [o.name for o in a.outputs] == ["classes"] and len(a.raw_output_contents) == 1),
        "spec: Inference Request (outputs)",
    ),
    Case(
        "grpc ModelInfer BYTES raw: 4-byte little-endian lengths",
        _rpc("ModelInfer", _png_request()),
        _ok(_two_decoded_images),
        "Triton docs/protocol/extension_binary_data.md (BYTES)",
    ),
    Case(
        "grpc ModelInfer version label",
        _rpc("ModelInfer", _infer_request(version="stable")),
        _ok(lambda a: a.model_version == "1"),
        "ours: labels as versions (TF Serving's version_labels)",
    ),
    Case(
        "grpc ModelInfer version not loaded",
        _rpc("ModelInfer", _infer_request(version="9")),
        _code(grpc.StatusCode.NOT_FOUND, "'mnist' version 9 is not found"),
        "Triton core src/model_repository_manager/model_lifecycle.cc GetModel",
    ),
    Case(
        "grpc ModelInfer wrong datatype",
        _rpc("ModelInfer", _with(_infer_request(), lambda r: setattr(r.inputs[0], "datatype", "INT8"))),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "data-type is 'INT8', but model 'mnist' expects 'UINT8'"),
        "Triton core src/infer_request.cc",
    ),
    Case(
        "grpc ModelInfer wrong shape",
        _rpc("ModelInfer", _infer_request(images=TEST.images[:2].reshape(2, 784))),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'images'"),
        "Triton core src/infer_request.cc",
    ),
    Case(
        "grpc ModelInfer raw size mismatch",
        _rpc("ModelInfer", _with(_infer_request(), lambda r: r.raw_input_contents.__setitem__(0, b"abc"))),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "unexpected size 3 for input 'images'"),
        "Triton core src/infer_request.cc (input byte size)",
    ),
    Case(
        "grpc ModelInfer raw count mismatch",
        _rpc("ModelInfer", _with(_infer_request(), lambda r: r.raw_input_contents.append(b""))),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "expected 1 raw input contents, got 2"),
        "Triton src/grpc/infer_handler.cc",
    ),
    Case(
        "grpc ModelInfer unknown output",
        _rpc("ModelInfer", _with(_infer_request(), lambda r: r.outputs.add(name="x"))),
        _code(grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference output 'x'"),
        "Triton core src/model.cc",
    ),
    Case(
        "grpc ModelInfer huge declared shape: refused before decoding",
        _rpc("ModelInfer", _HUGE),
        _code(grpc.StatusCode.RESOURCE_EXHAUSTED, "2000 images in one request"),
        "ours: Limits, as TF Serving's protocol here",
    ),
    Case(
        "grpc method not implemented",
        _rpc("ModelConfig", service_pb2.ModelConfigRequest(name="mnist")),
        _code(grpc.StatusCode.UNIMPLEMENTED),
        "grpc: method not registered",
    ),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=lambda c: c.name)
def test_grpc_conformance(app, case: Case) -> None:
    case.check(case.call(app))


def _http(method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    def call(app):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(app["url"] + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
                return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    return call


def _status(status: int, error: str | None = None) -> Callable[[Any], None]:
    def check(answer) -> None:
        assert answer[0] == status, answer
        if error is not None:
            assert error in json.loads(answer[2])["error"], answer

    return check


def _json(predicate: Callable[[dict], bool]) -> Callable[[Any], None]:
    def check(answer) -> None:
        assert answer[0] == 200, answer
        assert predicate(json.loads(answer[2])), answer

    return check


def _json_infer(data, shape=(1, 28, 28), **extra) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(shape), "data": data}], **extra}


_IMAGE = TEST.images[0]


def _binary_body(
    images: np.ndarray, declared_bytes: int | None = None, extra: bytes = b""
) -> tuple[bytes, dict]:
    raw = images.tobytes()
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": declared_bytes or len(raw)},
            }
        ],
        "outputs": [{"name": "classes", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    return text + raw + extra, {
        "Inference-Header-Content-Length": str(len(text)),
        "Content-Type": "application/octet-stream",
    }


def _binary_classes(answer) -> None:
    status, headers, body = answer
    assert status == 200, answer
    split = int(headers["inference-header-content-length"])
    header = json.loads(body[:split])
    assert header["outputs"] == [
        {"name": "classes", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}
    ]
    assert np.frombuffer(body[split:], "<i8").tolist() == TEST.labels[:2].tolist()


HTTP_CASES = [
    Case(
        "rest GET /v2/health/live", _http("GET", "/v2/health/live"), _status(200), "spec: Health (200 true)"
    ),
    Case("rest GET /v2/health/ready", _http("GET", "/v2/health/ready"), _status(200), "spec: Health"),
    Case(
        "rest POST /v2/health/live: 405",
        _http("POST", "/v2/health/live", b""),
        _status(405, "Method Not Allowed"),
        "Triton src/http_server.cc HandleServerHealth",
    ),
    Case(
        "rest GET /v2 server metadata",
        _http("GET", "/v2"),
        _json(lambda d: d["name"] == "mnist-ray" and d["extensions"] == ["binary_tensor_data"]),
        "spec: Server Metadata",
    ),
    Case(
        "rest GET /v2/models/mnist metadata",
        _http("GET", "/v2/models/mnist"),
        _json(
            lambda d: (
                d["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}]
                and d["versions"] == ["1"]
            )
        ),
        "spec: Model Metadata",
    ),
    Case(
        "rest GET /v2/models/mnist/versions/1 metadata",
        _http("GET", "/v2/models/mnist/versions/1"),
        _json(lambda d: d["name"] == "mnist"),
        "spec: Model Metadata",
    ),
    Case(
        "rest metadata of an unknown model: 404",
        _http("GET", "/v2/models/nope"),
        _status(404, "Request for unknown model: 'nope' is not found"),
        "Triton src/http_server.cc HttpCodeFromError (NOT_FOUND -> 404)",
    ),
    Case(
        "rest model ready",
        _http("GET", "/v2/models/mnist/versions/stable/ready"),
        _status(200),
        "spec: Health, model ready",
    ),
    Case(
        "rest unknown model not ready: 404",
        _http("GET", "/v2/models/nope/ready"),
        _status(404, "Request for unknown model: 'nope' is not found"),
        "Triton src/http_server.cc HandleModelReady, HttpCodeFromError",
    ),
    Case(
        "rest infer, nested JSON data",
        _http("POST", "/v2/models/mnist/infer", _json_infer(_IMAGE[None].tolist())),
        _json(
            lambda d: (
                d["model_version"] == "1"
                and {o["name"]: o["data"] for o in d["outputs"]}["classes"] == [int(TEST.labels[0])]
            )
        ),
        "spec: Inference Request JSON, $tensor data (nested)",
    ),
    Case(
        "rest infer, flat JSON data, requested output",
        _http(
            "POST",
            "/v2/models/mnist/infer",
            _json_infer(_IMAGE.reshape(-1).tolist(), outputs=[{"name": "probabilities"}], id="a1"),
        ),
        _json(
            lambda d: (
                d["id"] == "a1"
                and [o["name"] for o in d["outputs"]] == ["probabilities"]
                and d["outputs"][0]["shape"] == [1, 10]
                and len(d["outputs"][0]["data"]) == 10
            )
        ),
        "spec: $tensor data (flat, row-major)",
    ),
    Case(
        "rest infer, binary in and out",
        _http("POST", "/v2/models/mnist/infer", *_binary_body(TEST.images[:2])),
        _binary_classes,
        "Triton docs/protocol/extension_binary_data.md",
    ),
    Case(
        "rest infer, binary section longer than declared",
        _http("POST", "/v2/models/mnist/infer", *_binary_body(TEST.images[:2], extra=b"xx")),
        _status(400, "unexpected additional input data for model 'mnist'"),
        "Triton src/http_server.cc (EVBufferToInput)",
    ),
    Case(
        "rest infer, binary section shorter than declared",
        _http("POST", "/v2/models/mnist/infer", *_binary_body(TEST.images[:2], declared_bytes=2 * 784 + 10)),
        _status(400, "unexpected size for input 'images'"),
        "Triton src/http_server.cc (EVBufferToInput)",
    ),
    Case(
        "rest infer, header length over the body",
        _http("POST", "/v2/models/mnist/infer", b"{}", {"Inference-Header-Content-Length": "99"}),
        _status(400, "inference header size should be in range"),
        "Triton src/http_server.cc GetInferenceHeaderLength",
    ),
    Case(
        "rest infer, malformed JSON",
        _http("POST", "/v2/models/mnist/infer", b"{", {"Content-Type": "application/json"}),
        _status(400, "failed to parse the request JSON buffer"),
        "Triton src/http_server.cc HandleInfer",
    ),
    Case(
        "rest infer, data count does not match the shape",
        _http("POST", "/v2/models/mnist/infer", _json_infer([1, 2, 3])),
        _status(400, "shape does not match true shape of 'data' field"),
        "Triton src/http_server.cc ReadDataFromJson",
    ),
    Case(
        "rest infer, huge declared shape: refused before decoding",
        _http("POST", "/v2/models/mnist/infer", _json_infer([0], shape=(2000, 28, 28))),
        _status(429, "2000 images in one request"),
        "ours: Limits, as TF Serving's protocol here",
    ),
    Case(
        "rest infer of an unknown model: 404",
        _http("POST", "/v2/models/nope/infer", _json_infer([0])),
        _status(404, "Request for unknown model"),
        "Triton src/http_server.cc HttpCodeFromError",
    ),
    Case(
        "rest GET .../infer: 405",
        _http("GET", "/v2/models/mnist/infer"),
        _status(405, "Method Not Allowed"),
        "Triton src/http_server.cc HandleInfer",
    ),
    Case(
        "rest unknown /v2 path: 404",
        _http("GET", "/v2/models/mnist/config"),
        _status(404, "Not Found"),
        "Triton src/http_server.cc Handle (fallback)",
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda c: c.name)
def test_rest_conformance(app, case: Case) -> None:
    case.check(case.call(app))


def test_every_conformance_case_is_in_the_docs_table() -> None:
    """docs/oip.md's table lists exactly these cases (this module runs them)."""
    text = (REPO / "docs" / "oip.md").read_text()
    rows = {
        line.split("|")[1].strip()
        for line in text.splitlines()
        if line.startswith("| ") and line.count("|") >= 4
    }
    names = {case.name for case in GRPC_CASES + HTTP_CASES}
    assert names <= rows, sorted(names - rows)
