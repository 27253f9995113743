"""The Serve app for real: serve_configs/local.yaml deployed on a local Ray, stock TF Serving clients.

One Ray cluster and one deployment are shared by the module; ports are free ones.
"""

import base64
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import tensorflow as tf
import yaml
from PIL import Image
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from ray_app.config import AppConfig
from ray_app.ports import free_port
from tests.conftest import publish_copy
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEST = load_mnist().test
SAMPLES = json.loads((REPO / "data" / "samples.json").read_text())


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / "serve_configs" / name).read_text())


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_configs_pass_serve_schema_and_ours(name):
    config = (
        ServeDeploySchema.model_validate(_load_yaml(name))
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(_load_yaml(name))
    )
    app = config.applications[0]
    AppConfig.model_validate(app.args)
    deployment = app.deployments[0]
    assert deployment.max_ongoing_requests >= deployment.user_config["max_batch_size"]
    assert config.grpc_options.port == 9000 and config.http_options.port == 8000


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_export):
    """local.yaml's deployment, on free ports, serving a temporary store with version 1."""
    store = tmp_path_factory.mktemp("store") / "mnist"
    publish_copy(trained_export, store, 1)
    raw = _load_yaml("local.yaml")
    app_yaml = raw["applications"][0]
    deployment = dict(app_yaml["deployments"][0])
    deployment.pop("name")
    deployment["user_config"] = {**deployment["user_config"], "batch_wait_timeout_s": 0.005}
    grpc_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(
            port=grpc_port, grpc_servicer_functions=raw["grpc_options"]["grpc_servicer_functions"]
        ),
    )
    from ray_app.deployment import MnistServer

    args = {**app_yaml["args"], "model_base_path": str(store), "poll_interval_s": 0.5}
    serve.run(
        MnistServer.options(**deployment).bind(AppConfig.model_validate(args).model_dump()),
        name="mnist",
        route_prefix="/",
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield {
        "store": store,
        "channel": channel,
        "http": f"http://127.0.0.1:{http_port}",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "export": trained_export,
    }
    channel.close()
    serve.shutdown()
    ray.shutdown()


def _predict_request(images: np.ndarray, **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "mnist")
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def _stub(served):
    return prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])


def test_stock_grpc_client_predicts_real_digits(served):
    response = _stub(served).Predict(_predict_request(TEST.images[:64]), timeout=30)
    classes = tf.make_ndarray(response.outputs["classes"])
    assert np.mean(classes == TEST.labels[:64]) >= 0.9
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_predict_images_signature_like_tf_servings_mnist_example(served):
    flat = TEST.images[:32].reshape(32, 784).astype(np.float32) / 255.0
    response = _stub(served).Predict(_predict_request(flat, signature_name="predict_images"), timeout=30)
    scores = tf.make_ndarray(response.outputs["scores"])
    assert scores.shape == (32, 10) and np.mean(np.argmax(scores, 1) == TEST.labels[:32]) >= 0.9


def test_encoded_png_samples_over_grpc(served):
    names = sorted(SAMPLES)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "predict_image_bytes"
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto([(REPO / "data" / n).read_bytes() for n in names])
    )
    classes = tf.make_ndarray(_stub(served).Predict(request, timeout=30).outputs["classes"])
    assert np.mean(classes == np.array([SAMPLES[n] for n in names])) >= 0.8


def test_status_metadata_and_unimplemented(served):
    status = model_service_pb2_grpc.ModelServiceStub(served["channel"]).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=30
    )
    assert [s.version for s in status.model_version_status] == [1]
    assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    metadata = _stub(served).GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "mnist"}, metadata_field=["signature_def"]
        ),
        timeout=30,
    )
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signature_map)
    assert {"serving_default", "predict_images", "predict_image_bytes"} <= set(signature_map.signature_def)
    with pytest.raises(grpc.RpcError) as info:
        _stub(served).Classify(classification_pb2.ClassificationRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("request_factory", "code", "text"),
    [
        (lambda: _predict_request(TEST.images[:1], name="other"), grpc.StatusCode.NOT_FOUND, "model 'other'"),
        (lambda: _predict_request(TEST.images[:1], version=42), grpc.StatusCode.NOT_FOUND, "version 42"),
        (
            lambda: _predict_request(TEST.images[:1], signature_name="x"),
            grpc.StatusCode.NOT_FOUND,
            "signature 'x'",
        ),
        (
            lambda: _predict_request(TEST.images[:1].astype(np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype",
        ),
        (lambda: _predict_request(TEST.images[:0]), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        (lambda: _predict_request(TEST.images[:2000]), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 1024"),
    ],
)
def test_grpc_errors_have_codes_and_messages(served, request_factory, code, text):
    with pytest.raises(grpc.RpcError) as info:
        _stub(served).Predict(request_factory(), timeout=30)
    assert info.value.code() == code
    assert text in info.value.details() and "Traceback" not in info.value.details()


def test_malformed_request_bytes_are_invalid_argument(served):
    raw_predict = served["channel"].unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as info:
        raw_predict(b"\xff\xff\xff not a protobuf", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed PredictRequest" in info.value.details()


def _http(served, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(served["http"] + path, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_api_row_and_columnar_formats(served):
    status, body = _http(served, "/v1/models/mnist:predict", {"instances": TEST.images[:8].tolist()})
    assert status == 200
    assert [p["classes"] for p in body["predictions"]] == tf.make_ndarray(
        _stub(served).Predict(_predict_request(TEST.images[:8]), timeout=30).outputs["classes"]
    ).tolist()
    flat = (TEST.images[:4].reshape(4, 784) / 255.0).tolist()
    status, body = _http(
        served,
        "/v1/models/mnist/versions/1:predict",
        {"signature_name": "predict_images", "inputs": {"images": flat}},
    )
    assert status == 200 and np.array(body["outputs"]).shape == (4, 10)
    png = base64.b64encode((REPO / "data" / "0.png").read_bytes()).decode()
    status, body = _http(
        served,
        "/v1/models/mnist:predict",
        {"signature_name": "predict_image_bytes", "instances": [{"b64": png}]},
    )
    assert status == 200 and body["predictions"][0]["classes"] == SAMPLES["0.png"]


def test_rest_status_metadata_and_errors(served):
    assert _http(served, "/v1/models/mnist")[1]["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = _http(served, "/v1/models/mnist/metadata")[1]
    assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]
    assert _http(served, "/v1/models/other:predict", {"instances": [[0]]})[0] == 404
    assert _http(served, "/v1/models/mnist/versions/9")[0] == 404
    status, body = _http(served, "/v1/models/mnist:predict", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = _http(served, "/v1/models/mnist:predict", {"instances": [[1, 2]]})
    assert status == 400 and "shape" in body["error"]
    status, body = _http(served, "/v1/models/mnist:predict", {"instances": [np.full((28, 28), 300).tolist()]})
    assert status == 400 and "uint8 range" in body["error"]


def test_command_line_client_against_the_app(served, capsys, tmp_path):
    from client import grpc_client
    from client.errors import ExitCode

    def run(*argv: str) -> tuple[int, str, str]:
        code = grpc_client.main(["--host", "127.0.0.1", "--timeout-s", "30", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    samples = str(REPO / "data")
    labels = str(REPO / "data" / "samples.json")
    grpc_port, http_port = str(served["grpc_port"]), str(served["http_port"])
    for extra in (
        [],
        ["--send-bytes"],
        ["--rest", "--port", http_port],
        ["--rest", "--send-bytes", "--port", http_port],
    ):
        port = [] if "--rest" in extra else ["--port", grpc_port]
        code, out, err = run(
            "--image", samples, "--labels", labels, "--version", "1", "--json", *port, *extra
        )
        assert code == 0, err  # (stderr also carries Ray's log lines here)
        document = json.loads(out)
        assert document["checked"] == 10 and document["correct"] >= 9, extra
        assert {p["version"] for p in document["predictions"]} == {1}  # REST: from X-Model-Version
    code, out, _ = run("--image", str(REPO / "data" / "0.png"), "--port", grpc_port)
    assert code == 0 and out.startswith("Predicted Digit:  0\nPredicted Confidence:  0.")
    code, _, err = run("--image", samples, "--port", grpc_port, "--version", "9")
    assert code == ExitCode.NOT_FOUND and "version 9" in err
    code, _, err = run("--image", samples, "--rest", "--port", http_port, "--model", "other")
    assert code == ExitCode.NOT_FOUND and "(HTTP 404" in err
    blank = tmp_path / "blank.png"  # a valid PNG with no digit: the server's preprocessing refuses it
    Image.new("L", (40, 40), color=255).save(blank)
    code, _, err = run("--image", str(blank), "--send-bytes", "--port", grpc_port)
    assert code == ExitCode.INVALID_ARGUMENT and "image has no digit (blank)" in err


def test_new_version_is_served_under_load_without_failures(served):
    """Publish version 2 while 4 clients hammer the app: no request fails, v2 answers within the poll."""
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []
    request = _predict_request(TEST.images[:1])

    def client() -> None:
        stub = _stub(served)
        while not stop.is_set():
            try:
                seen.append(stub.Predict(request, timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        time.sleep(1.0)
        publish_copy(served["export"], served["store"], 2)
        published_at = time.monotonic()
        while 2 not in seen[-20:] and time.monotonic() - published_at < 20:
            time.sleep(0.05)
        switched_s = time.monotonic() - published_at
        time.sleep(1.0)
        stop.set()
    assert not failures, failures[:3]
    assert 2 in seen and seen[-1] == 2
    assert switched_s < 10, switched_s  # poll interval 0.5 s plus load and warm-up
    pinned = _stub(served).Predict(_predict_request(TEST.images[:1], version=1), timeout=30)
    assert pinned.model_spec.version.value == 1  # the previous version is still loaded


def test_overload_gets_resource_exhausted_quickly(served):
    """With tiny queues, excess concurrent requests are refused at once instead of timing out."""
    from ray_app.deployment import MnistServer

    args = {**_load_yaml("local.yaml")["applications"][0]["args"], "model_base_path": str(served["store"])}
    serve.run(
        MnistServer.options(
            max_ongoing_requests=1,
            max_queued_requests=1,
            user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
            ray_actor_options={"num_cpus": 0.5},
        ).bind(AppConfig.model_validate(args).model_dump()),
        name="mnist",
        route_prefix="/",
    )
    request = _predict_request(TEST.images[:512])  # slow enough to keep the replica busy

    def call() -> tuple[grpc.StatusCode, float]:
        started = time.monotonic()
        try:
            _stub(served).Predict(request, timeout=30)
            return grpc.StatusCode.OK, time.monotonic() - started
        except grpc.RpcError as exc:
            return exc.code(), time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: call(), range(32)))
    codes = [code for code, _ in outcomes]
    assert grpc.StatusCode.OK in codes
    refused = [seconds for code, seconds in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert min(refused) < 5.0
    status, body = _http(served, "/v1/models/mnist")
    assert status == 200  # still healthy afterwards
