"""Conformance: the app answers as TF Serving answers, on the wire, for code written for TF Serving.

Each case is a request (gRPC through the stock ``tensorflow-serving-api`` stubs, or REST), the
answer TF Serving gives, and where in TF Serving's source (github.com/tensorflow/serving, or
tensorflow/tensorflow where TF Serving calls into TF) that behaviour comes from. They run against
serve_configs/local.yaml's deployment behind the front door, on one local Ray for the module.

Also here: a client written only against TF Serving's documented API (stubs, typed fields, no code
of ours) that classifies all 10,000 test images, and TF Serving's own example client
(from a TF Serving checkout, when TF_SERVING_EXAMPLE_DIR names it) run unchanged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEST = load_mnist().test


@pytest.fixture(scope="module")
def own_classes(trained_export) -> np.ndarray:
    """The served model's own answer for every test image, computed here with TensorFlow."""
    from training.export import load_classifier

    return load_classifier(trained_export)(TEST.images)


@pytest.fixture(scope="module")
def app(tmp_path_factory, trained_export):
    """local.yaml's deployment serving version 1, label ``stable`` -> 1."""
    store = tmp_path_factory.mktemp("store") / "mnist"
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        run_local_app(store, user_config={"version_labels": {"stable": 1}})
        channel = grpc.insecure_channel(ports.grpc_address)
        yield {"channel": channel, "http": ports.http, "grpc_address": ports.grpc_address}
        channel.close()


def _predict_stub(app) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(app["channel"])


# -- the table ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Any], Any]  # app -> the answer (a response, or (code, details), or (status, body))
    check: Callable[[Any], None]
    source: str  # where TF Serving does this


def _predict(**spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    spec.setdefault("name", "mnist")
    images = spec.pop("images", TEST.images[:3])
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    if images is not None:
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def _grpc(method: str, request) -> Callable[[Any], Any]:
    def call(app):
        stub = (
            model_service_pb2_grpc.ModelServiceStub(app["channel"])
            if method == "GetModelStatus"
            else _predict_stub(app)
        )
        try:
            return getattr(stub, method)(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    return call


def _error(code: grpc.StatusCode, details: str, exact: bool = True) -> Callable[[Any], None]:
    def check(answer) -> None:
        assert isinstance(answer, tuple), f"expected {code.name}, got an answer"
        assert answer[0] == code, answer
        # HAProxy trims trailing whitespace from the grpc-message trailer (one TF Serving text ends in a space)
        assert answer[1] == details.rstrip() if exact else answer[1].startswith(details), answer[1]

    return check


def _with(request, mutate: Callable[[Any], None]):
    mutate(request)
    return request


def _check_typed_outputs(response) -> None:
    probabilities, classes = response.outputs["probabilities"], response.outputs["classes"]
    assert len(probabilities.float_val) == 30 and not probabilities.tensor_content
    assert len(classes.int64_val) == 3 and not classes.tensor_content
    assert [d.size for d in probabilities.tensor_shape.dim] == [3, 10]
    assert list(classes.int64_val) == TEST.labels[:3].tolist()


def _check_model_spec(response) -> None:
    assert (response.model_spec.name, response.model_spec.version.value) == ("mnist", 1)
    assert response.model_spec.signature_name == "serving_default"
    assert not response.model_spec.version_label


def _check_metadata(response) -> None:
    assert response.model_spec.name == "mnist" and response.model_spec.version.value == 1
    assert not response.model_spec.signature_name
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "predict_images", "__saved_model_init_op"} <= set(signatures.signature_def)
    images = signatures.signature_def["serving_default"].inputs["images"]
    assert images.name == "serving_default_images:0" and images.dtype == tf.uint8.as_datatype_enum


def _check_status(response) -> None:
    (status,) = response.model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.HasField("status") and status.status.error_code == 0 and not status.status.error_message


def _feed_name() -> str:
    return "serving_default_images:0"


GRPC_CASES = [
    Case(
        "predict answers in typed fields",
        _grpc("Predict", _predict()),
        _check_typed_outputs,
        "servables/tensorflow/predict_util.cc PostProcessPredictionResult (kAsProtoField, the default "
        "of model_servers/server_core.h); tensorflow/core/framework/tensor.cc Tensor::AsProtoField",
    ),
    Case(
        "model_spec echoed with the version that ran and serving_default",
        _grpc("Predict", _predict()),
        _check_model_spec,
        "predict_util.cc RunPredict; util.cc MakeModelSpec",
    ),
    Case(
        "a version label resolves to its number, not echoed",
        _grpc("Predict", _predict(version_label="stable")),
        _check_model_spec,
        "util.cc MakeModelSpec (Clear, then name/signature/version only)",
    ),
    Case(
        "no model_spec",
        _grpc("Predict", _with(_predict(), lambda r: r.ClearField("model_spec"))),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        "servables/tensorflow/predict_impl.cc TensorflowPredictor::Predict",
    ),
    Case(
        "empty model name",
        _grpc("Predict", _predict(name="")),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        "model_servers/server_core.cc ServableRequestFromModelSpec",
    ),
    Case(
        "unknown model",
        _grpc("Predict", _predict(name="foo")),
        _error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(foo)"),
        "core/basic_manager.cc ServingMap::GetUntypedServableHandle; core/manager.h DebugString",
    ),
    Case(
        "unknown version",
        _grpc("Predict", _predict(name="mnist", version=99)),
        _error(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(mnist, 99)"),
        "core/basic_manager.cc; core/manager.h (Specific(name, version))",
    ),
    Case(
        "unknown version label",
        _grpc("Predict", _predict(name="mnist", version_label="gold")),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: gold"),
        "model_servers/server_core.cc GetModelVersionForLabel",
    ),
    Case(
        "unknown signature",
        _grpc("Predict", _predict(name="mnist", signature_name="x")),
        _error(grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "x" not found.'),
        "predict_util.cc RunPredict",
    ),
    Case(
        "an extra input",
        _grpc(
            "Predict",
            _with(
                _predict(name="mnist"),
                lambda r: r.inputs["foo"].CopyFrom(tf.make_tensor_proto(TEST.images[:1])),
            ),
        ),
        _error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "input size does not match signature: 2!=1 len({foo,images}) != len({images}). "
            "Sent extra: {foo}. Missing but required: {}.",
        ),
        "predict_util.cc VerifyRequestInputsSize",
    ),
    Case(
        "an input under another name",
        _grpc(
            "Predict",
            _with(
                _predict(name="mnist", images=None),
                lambda r: r.inputs["x"].CopyFrom(tf.make_tensor_proto(TEST.images[:1])),
            ),
        ),
        _error(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Signature input alias: images(feed name: {_feed_name()}) not found in request and no default "
            "value provided. Inputs expected to be in the request {x}, or default input alias set: ",
        ),
        "tensorflow/tensorflow tensorflow/cc/saved_model/util.cc GetInputValues",
    ),
    Case(
        "a tensor TF cannot parse",
        _grpc(
            "Predict",
            _with(_predict(name="mnist"), lambda r: setattr(r.inputs["images"], "tensor_content", b"short")),
        ),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error: images"),
        "tensorflow/cc/saved_model/util.cc GetInputValues (Tensor::FromProto fails)",
    ),
    Case(
        "the wrong dtype",
        _grpc("Predict", _predict(name="mnist", images=TEST.images[:2].astype(np.float32))),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "Expects arg[0] to be uint8 but float is provided"),
        "tensorflow/tensorflow tensorflow/core/framework/function.cc FunctionCallFrame::SetArgs",
    ),
    Case(
        "output_filter names an unknown output",
        _grpc("Predict", _with(_predict(name="mnist"), lambda r: r.output_filter.append("scores"))),
        _error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "output tensor alias not found in signature: scores Outputs expected to be in the set "
            "{classes,probabilities}.",
        ),
        "predict_util.cc PreProcessPrediction",
    ),
    Case(
        "output_filter names an output twice",
        _grpc(
            "Predict", _with(_predict(name="mnist"), lambda r: r.output_filter.extend(["classes", "classes"]))
        ),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias: classes"),
        "predict_util.cc PreProcessPrediction",
    ),
    Case(
        "metadata: the SavedModel's signatures and the version",
        _grpc(
            "GetModelMetadata",
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "mnist"}, metadata_field=["signature_def"]
            ),
        ),
        _check_metadata,
        "servables/tensorflow/get_model_metadata_impl.cc GetModelMetadata (every SignatureDef, model_spec "
        "name + version)",
    ),
    Case(
        "metadata without a field",
        _grpc(
            "GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "mnist"})
        ),
        _error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "GetModelMetadataRequest must specify at least one metadata_field",
        ),
        "get_model_metadata_impl.cc ValidateGetModelMetadataRequest",
    ),
    Case(
        "metadata for an unsupported field",
        _grpc(
            "GetModelMetadata",
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "mnist"}, metadata_field=["foo"]
            ),
        ),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field foo is not supported"),
        "servables/tensorflow/tfrt_servable.cc ValidateGetModelMetadataRequest (the classic path's text has "
        "a formatting slip: 'Metadata field %s is not supportedfoo')",
    ),
    Case(
        "status of the model",
        _grpc("GetModelStatus", get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"})),
        _check_status,
        "model_servers/get_model_status_impl.cc GetModelStatus; util/status_util.cc ToStatusProto",
    ),
    Case(
        "status ignores a label",
        _grpc(
            "GetModelStatus",
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist", "version_label": "nope"}),
        ),
        _check_status,
        "get_model_status_impl.cc (only has_version() is looked at)",
    ),
    Case(
        "status of an unknown version",
        _grpc(
            "GetModelStatus",
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist", "version": {"value": 7}}),
        ),
        _error(grpc.StatusCode.NOT_FOUND, "Could not find version 7 of model mnist"),
        "get_model_status_impl.cc GetModelStatusWithModelSpec",
    ),
    Case(
        "status of an unknown model",
        _grpc("GetModelStatus", get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "foo"})),
        _error(grpc.StatusCode.NOT_FOUND, "Could not find any versions of model foo"),
        "get_model_status_impl.cc GetModelStatusWithModelSpec",
    ),
    Case(
        "Classify on a model without a classification signature",
        _grpc("Classify", classification_pb2.ClassificationRequest(model_spec={"name": "mnist"})),
        _error(
            grpc.StatusCode.INVALID_ARGUMENT, "No classification inputs found in SignatureDef: ", exact=False
        ),
        "servables/tensorflow/classifier.cc PreProcessClassification (method-name check off by default)",
    ),
    Case(
        "Regress on a two-output signature",
        _grpc("Regress", regression_pb2.RegressionRequest(model_spec={"name": "mnist"})),
        _error(grpc.StatusCode.INVALID_ARGUMENT, "Expected one output Tensor."),
        "servables/tensorflow/regressor.cc PreProcessRegression",
    ),
    Case(
        "MultiInference with a predict task",
        _grpc(
            "MultiInference",
            inference_pb2.MultiInferenceRequest(
                tasks=[{"model_spec": {"name": "mnist"}, "method_name": "tensorflow/serving/predict"}]
            ),
        ),
        _error(
            grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: tensorflow/serving/predict"
        ),
        "servables/tensorflow/multi_inference.cc TensorFlowMultiInferenceRunner::Infer",
    ),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=lambda c: c.name)
def test_grpc_answers_as_tf_serving(app, case: Case) -> None:
    case.check(case.call(app))


# -- REST -----------------------------------------------------------------------------------------------
def _rest(method: str, path: str, body: bytes | dict | None = None) -> Callable[[Any], Any]:
    def call(app):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(app["http"] + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.headers.get("Content-Type"), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type"), exc.read().decode()

    return call


def _rest_error(status: int, message: str) -> Callable[[Any], None]:
    def check(answer) -> None:
        code, content_type, text = answer
        assert (code, content_type) == (status, "application/json"), answer
        assert json.loads(text) == {"error": message}

    return check


def _rest_json(check_body: Callable[[Any], None]) -> Callable[[Any], None]:
    def check(answer) -> None:
        code, content_type, text = answer
        assert (code, content_type) == (200, "application/json"), answer
        check_body(json.loads(text))
        for token in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?|-?\d+e[-+]\d+", text):
            from ray_app.rest_bodies import format_float

            assert format_float(float(np.float32(token))) == token, token  # TF Serving's number rendering

    return check


def _status_json(body) -> None:
    assert body == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }


def _rows_single_output(body) -> None:
    predictions = np.asarray(body["predictions"])
    assert predictions.shape == (2, 10) and np.argmax(predictions, 1).tolist() == TEST.labels[:2].tolist()


def _rows_several_outputs(body) -> None:
    assert [sorted(row) for row in body["predictions"]] == [["classes", "probabilities"]] * 2
    assert [row["classes"] for row in body["predictions"]] == TEST.labels[:2].tolist()


def _columns_several_outputs(body) -> None:
    assert sorted(body["outputs"]) == ["classes", "probabilities"]
    assert body["outputs"]["classes"] == TEST.labels[:2].tolist()


def _metadata_json(body) -> None:
    assert body["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert signatures["predict_images"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert signatures["predict_images"]["inputs"]["images"]["tensor_shape"]["dim"][1] == {
        "size": "784",
        "name": "",
    }
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"


FLAT = (TEST.images[:2].reshape(2, 784) / 255.0).tolist()
REST_CASES = [
    Case("status JSON", _rest("GET", "/v1/models/mnist"), _rest_json(_status_json), "model_servers/http_rest_api_handler.cc ProcessModelStatusRequest (MessageToJson, enums as names, int64 as strings)"),
    Case("metadata JSON", _rest("GET", "/v1/models/mnist/versions/1/metadata"), _rest_json(_metadata_json), "http_rest_api_util.cc ToJsonString(GetModelMetadataResponse)"),
    Case("row format, one output: a list of values", _rest("POST", "/v1/models/mnist:predict", {"signature_name": "predict_images", "instances": FLAT}), _rest_json(_rows_single_output), "util/json_tensor.cc MakeRowFormatJsonFromTensors"),
    Case("row format, several outputs: a list of objects", _rest("POST", "/v1/models/mnist/labels/stable:predict", {"instances": TEST.images[:2].tolist()}), _rest_json(_rows_several_outputs), "json_tensor.cc MakeRowFormatJsonFromTensors"),
    Case("columnar format", _rest("POST", "/v1/models/mnist/versions/1:predict", {"inputs": {"images": TEST.images[:2].tolist()}}), _rest_json(_columns_several_outputs), "json_tensor.cc MakeColumnarFormatJsonFromTensors"),
    Case("empty body", _rest("POST", "/v1/models/mnist:predict", b""), _rest_error(400, "JSON Parse error: The document is empty"), "json_tensor.cc FillPredictRequestFromJson"),
    Case("not JSON", _rest("POST", "/v1/models/mnist:predict", b"{x"), _rest_error(400, "JSON Parse error: Missing a name for object member. at offset: 1"), "json_tensor.cc (RapidJSON's GetParseError_En)"),
    Case("neither instances nor inputs", _rest("POST", "/v1/models/mnist:predict", {"signature_name": "predict_images"}), _rest_error(400, "Missing 'inputs' or 'instances' key"), "json_tensor.cc FillPredictRequestFromJson"),
    Case("unknown model", _rest("POST", "/v1/models/foo:predict", {"instances": [1]}), _rest_error(404, "Servable not found for request: Latest(foo)"), "http_rest_api_handler.cc ProcessPredictRequest -> core/basic_manager.cc"),
    Case("unknown label", _rest("POST", "/v1/models/mnist/labels/gold:predict", {"instances": [1]}), _rest_error(400, "Unrecognized servable version label: gold"), "server_core.cc; http_server.cc ToHTTPStatusCode (INVALID_ARGUMENT -> 400)"),
    Case("unknown signature (REST text)", _rest("POST", "/v1/models/mnist:predict", {"signature_name": "x", "instances": [1]}), _rest_error(400, 'Serving signature name: "x" not found in signature def'), "http_rest_api_handler.cc GetInfoMap"),
    Case("a number where uint8 is expected", _rest("POST", "/v1/models/mnist:predict", {"instances": [np.full((28, 28), 0.5).tolist()]}), _rest_error(400, "JSON Value: 0.5 Type: Number is not of expected type: uint8"), "json_tensor.cc AddValueToTensor"),
    Case("status of an unknown version", _rest("GET", "/v1/models/mnist/versions/7"), _rest_error(404, "Could not find version 7 of model mnist"), "get_model_status_impl.cc"),
    Case("other methods under /v1/", _rest("PUT", "/v1/models/mnist", b"{}"), _rest_error(400, "Malformed request: PUT /v1/models/mnist"), "http_rest_api_handler.cc ProcessRequest"),
    Case("a query string breaks the predict pattern", _rest("POST", "/v1/models/mnist:predict?x=1", {"instances": [1]}), _rest_error(400, "Malformed request: POST /v1/models/mnist:predict?x=1"), "http_rest_api_util.cc kPredictionApiGegex (matched on path and query)"),
]  # fmt: skip


@pytest.mark.parametrize("case", REST_CASES, ids=lambda c: c.name)
def test_rest_answers_as_tf_serving(app, case: Case) -> None:
    case.check(case.call(app))


def test_paths_outside_v1_get_libevents_html_404(app) -> None:
    code, content_type, text = _rest("GET", "/v3/models/mnist")(app)  # /v2 is the Open Inference Protocol's
    assert (code, content_type) == (404, "text/html; charset=ISO-8859-1")
    assert "<TITLE>404 Not Found</TITLE>" in text


# -- clients written for TF Serving --------------------------------------------------------------------
def test_a_stock_client_gets_the_models_own_answer_for_every_test_image(app, own_classes) -> None:
    """Only the documented API: the stubs, a TensorProto built by TF, and the typed field read back.
    All 10,000 answers are the digit the SavedModel itself gives (TF in this process); the model is
    a quick one (about 97 %), so a wrong answer is a wrong serving path, not a weak model."""
    stub = _predict_stub(app)
    predicted = []
    for start in range(0, len(TEST), 250):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.model_spec.signature_name = "predict_images"
        flat = TEST.images[start : start + 250].reshape(-1, 784).astype(np.float32) / 255.0
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(flat))
        scores = np.array(stub.Predict(request, timeout=60).outputs["scores"].float_val).reshape(-1, 10)
        predicted.extend(np.argmax(scores, axis=1).tolist())
    assert len(predicted) == 10_000
    differing = np.flatnonzero(np.array(predicted) != own_classes)
    assert differing.size == 0, (
        f"{differing.size} answers differ from the model's own, e.g. image {differing[:5]}"
    )
    print(f"stock client: {np.mean(np.array(predicted) == TEST.labels):.2%} of {len(TEST)} test images right")


TF_SERVING_EXAMPLE_VARIABLE = "TF_SERVING_EXAMPLE_DIR"


def test_one_image_per_predict_as_tf_servings_example_client_asks(app, own_classes) -> None:
    """What tensorflow_serving/example/mnist_client.py does on the wire, written here: one Predict
    per image to model ``mnist``, signature ``predict_images``, input ``images`` float ``[1, 784]``
    in [0, 1], four requests in flight (``Predict.future``), the answer read from
    ``outputs['scores'].float_val``. That client hangs on a server that answers in tensor_content
    (the typed field stays empty): hence the futures' deadlines."""
    stub = _predict_stub(app)
    images = TEST.images[:400].reshape(-1, 784).astype(np.float32) / 255.0
    wrong = 0
    for start in range(0, len(images), 4):
        futures = []
        for index in range(start, start + 4):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            request.model_spec.signature_name = "predict_images"
            request.inputs["images"].CopyFrom(
                tf.make_tensor_proto(images[index], shape=[1, images[index].size])
            )
            futures.append((index, stub.Predict.future(request, 5.0)))
        for index, future in futures:
            scores = np.array(future.result().outputs["scores"].float_val)
            assert scores.shape == (10,)
            wrong += int(np.argmax(scores) != own_classes[index])
    assert wrong == 0, f"{wrong} of {len(images)} answers differ from the model's own"


def test_tf_servings_own_example_client_runs_unchanged(app, own_classes) -> None:
    """tensorflow_serving/example/mnist_client.py from a TF Serving checkout, as is: it prints its
    error rate. Not in this repository (it is TF Serving's code): point TF_SERVING_EXAMPLE_DIR at
    the ``tensorflow_serving/example`` folder of a checkout of tensorflow/serving (it needs
    ``pip install six`` too). The four IDX files it reads are in data/mnist, so it downloads nothing."""
    example = os.environ.get(TF_SERVING_EXAMPLE_VARIABLE)
    if not example:
        pytest.skip(
            f"set {TF_SERVING_EXAMPLE_VARIABLE} to the tensorflow_serving/example folder of a TF Serving "
            "checkout (git clone https://github.com/tensorflow/serving) to run its mnist_client.py here"
        )
    client = Path(example) / "mnist_client.py"
    assert client.is_file(), (
        f"{client} not found: {TF_SERVING_EXAMPLE_VARIABLE} must name tensorflow_serving/example"
    )
    result = subprocess.run(
        [
            sys.executable,
            str(client),
            f"--server={app['grpc_address']}",
            "--num_tests=1000",
            "--concurrency=4",
            f"--work_dir={REPO / 'data' / 'mnist'}",
        ],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rate = re.search(r"Inference error rate: ([\d.]+)%", result.stdout)
    assert rate, result.stdout[-2000:]
    own_error_percent = 100 * float(np.mean(own_classes != TEST.labels))
    print(
        f"mnist_client.py: inference error rate {rate.group(1)} % (the model's own: {own_error_percent:.2f} %)"
    )
    # it samples 1,000 of the test images: its rate is the model's, give or take sampling
    assert float(rate.group(1)) < own_error_percent + 2.0
