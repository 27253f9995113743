"""The Serve app for real: serve_configs/local.yaml deployed on a local Ray, stock TF Serving clients.

One Ray cluster and one deployment are shared by the module, behind the app's front door
(HAProxy + direct ingress, see tests/conftest.py); ports are free ones. When the module ends,
no Ray, replica or HAProxy process and no port of it may be left (tests/integration/cluster.py).
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
import tensorflow as tf
import yaml
from PIL import Image
from ray import serve
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
from tests.conftest import publish_copy
from tests.integration import prometheus
from tests.integration.cluster import local_serve, run_local_app
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
    # Clients reach TF Serving's ports, gRPC 9000 and HTTP 8000: Serve's own locally; on a cluster
    # the edge's (serve_configs/edge/cluster.yaml), which forwards to the ports gpu.yaml gives Serve.
    public = (config.grpc_options.port, config.http_options.port)
    if name == "gpu.yaml":
        edge = yaml.safe_load((REPO / "serve_configs" / "edge" / "cluster.yaml").read_text())
        assert (edge["upstream"]["grpc_port"], edge["upstream"]["http_port"]) == public
        public = (edge["grpc_port"], edge["http_port"])
    assert public == (9000, 8000)


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_export):
    """local.yaml's deployment behind the front door, on free ports, serving a store with version 1."""
    store = tmp_path_factory.mktemp("store") / "mnist"
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        deployment, args = run_local_app(
            store, user_config={"batch_wait_timeout_s": 0.005}, args={"poll_interval_s": 0.5}
        )
        channel = grpc.insecure_channel(ports.grpc_address)
        yield {
            "store": store,
            "channel": channel,
            "http": ports.http,
            "grpc_port": ports.grpc_port,
            "http_port": ports.http_port,
            "export": trained_export,
            "deployment": deployment,
            "args": args,
        }
        channel.close()


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


def _model_status(served) -> get_model_status_pb2.GetModelStatusResponse:
    return model_service_pb2_grpc.ModelServiceStub(served["channel"]).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=30
    )


def test_status_metadata_and_unimplemented(served):
    status = _model_status(served)
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
    with pytest.raises(grpc.RpcError) as info:  # TF Serving's answer for a model with no classify signature
        _stub(served).Classify(
            classification_pb2.ClassificationRequest(model_spec={"name": "mnist"}), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("No classification inputs found in SignatureDef: ")


@pytest.mark.parametrize(
    ("request_factory", "code", "text"),
    [
        (
            lambda: _predict_request(TEST.images[:1], name="other"),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(other)",
        ),
        (
            lambda: _predict_request(TEST.images[:1], version=42),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(mnist, 42)",
        ),
        (
            lambda: _predict_request(TEST.images[:1], signature_name="x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "x" not found.',
        ),
        (
            lambda: _predict_request(TEST.images[:1].astype(np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expects arg[0] to be uint8 but float is provided",
        ),
        (
            lambda: _predict_request(TEST.images[:2000]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "2000 images in one request; the limit is 1024",
        ),
    ],
)
def test_grpc_errors_have_codes_and_messages(served, request_factory, code, text):
    with pytest.raises(grpc.RpcError) as info:
        _stub(served).Predict(request_factory(), timeout=30)
    assert info.value.code() == code
    assert info.value.details().startswith(text) and "Traceback" not in info.value.details()


def test_malformed_request_bytes_are_invalid_argument(served):
    raw_predict = served["channel"].unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as info:
        raw_predict(b"\xff\xff\xff not a protobuf", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed PredictRequest" in info.value.details()


def _http(served, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        served["http"] + path, data=data, method="GET" if body is None else "POST"
    )
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
    assert (
        status == 400 and body["error"] == "JSON Parse error: Missing a name for object member. at offset: 1"
    )
    status, body = _http(served, "/v1/models/mnist:predict", {"instances": [[1, 2]]})
    assert status == 400 and "shape" in body["error"]
    status, body = _http(served, "/v1/models/mnist:predict", {"instances": [np.full((28, 28), 0.5).tolist()]})
    assert (status, body["error"]) == (400, "JSON Value: 0.5 Type: Number is not of expected type: uint8")


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
    assert code == ExitCode.NOT_FOUND and "Specific(mnist, 9)" in err
    code, _, err = run("--image", samples, "--rest", "--port", http_port, "--model", "other")
    assert code == ExitCode.NOT_FOUND and "(HTTP 404" in err
    blank = tmp_path / "blank.png"  # a valid PNG with no digit: the server's preprocessing refuses it
    Image.new("L", (40, 40), color=255).save(blank)
    code, _, err = run("--image", str(blank), "--send-bytes", "--port", grpc_port)
    assert code == ExitCode.INVALID_ARGUMENT and "image has no digit (blank)" in err


def test_new_version_is_served_under_load_without_failures(served):
    """Publish version 2 while gRPC and REST clients hammer the app: no request fails, v2 answers soon."""
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []
    request = _predict_request(TEST.images[:1])
    rest_body = json.dumps({"instances": TEST.images[:1].tolist()}).encode()

    def grpc_client() -> None:
        stub = _stub(served)
        while not stop.is_set():
            try:
                seen.append(stub.Predict(request, timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(f"gRPC {exc.code()}: {exc.details()}")

    def rest_client() -> None:
        url = served["http"] + "/v1/models/mnist:predict"
        while not stop.is_set():
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url, data=rest_body), timeout=30
                ) as answer:
                    seen.append(int(answer.headers["X-Model-Version"]))
            except (urllib.error.URLError, OSError) as exc:
                failures.append(f"REST {exc}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for client in (grpc_client, grpc_client, rest_client, rest_client):
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
    assert 2 in seen and seen[-1] == 2, f"not answering with version 2; status: {_version_states(served)}"
    assert switched_s < 10, switched_s  # poll interval 0.5 s plus load and warm-up
    pinned = _stub(served).Predict(_predict_request(TEST.images[:1], version=1), timeout=30)
    assert pinned.model_spec.version.value == 1  # the previous version is still loaded


def _version_states(served) -> str:
    """What one replica's GetModelStatus says of each version (its state and error), for failure
    messages: a version that was never served says why there."""
    return "; ".join(
        f"v{s.version} {get_model_status_pb2.ModelVersionStatus.State.Name(s.state)} {s.status.error_message!r}"
        for s in _model_status(served).model_version_status
    )


def _deploy(served, **options) -> None:
    from ray_app.deployment import MnistServer

    serve.run(
        MnistServer.options(**{**served["deployment"], **options}).bind(
            AppConfig.model_validate(served["args"]).model_dump()
        ),
        name="mnist",
        route_prefix="/",
    )


def test_overload_gets_resource_exhausted_and_429_quickly(served):
    """With tiny queues, excess concurrent requests are refused at once instead of timing out."""
    _deploy(
        served,
        max_ongoing_requests=1,
        max_queued_requests=1,
        user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    )
    try:
        request = _predict_request(TEST.images[:512])  # slow enough to keep the replica busy
        body = json.dumps({"instances": TEST.images[:256].tolist()}).encode()

        def call(index: int) -> tuple[str, float]:
            started = time.monotonic()
            if index % 2:
                try:
                    _stub(served).Predict(request, timeout=30)
                    return "OK", time.monotonic() - started
                except grpc.RpcError as exc:
                    return exc.code().name, time.monotonic() - started
            try:
                url = served["http"] + "/v1/models/mnist:predict"
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30):
                    return "OK", time.monotonic() - started
            except urllib.error.HTTPError as exc:
                return f"HTTP {exc.code}", time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(32)))
    finally:
        _deploy(served)  # the module's other tests expect local.yaml's settings
    codes = [code for code, _ in outcomes]
    assert "OK" in codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "HTTP 429"}, codes
    refused = [seconds for code, seconds in outcomes if code in ("RESOURCE_EXHAUSTED", "HTTP 429")]
    assert "RESOURCE_EXHAUSTED" in codes and "HTTP 429" in codes, codes
    assert min(refused) < 5.0
    status, _ = _http(served, "/v1/models/mnist")
    assert status == 200  # still healthy afterwards


def test_metrics_endpoint_counts_requests_by_version_signature_and_code(served):
    """Real requests, then Ray's Prometheus endpoint on the node: the app's counters moved, labelled."""
    stub = _stub(served)
    for _ in range(3):
        stub.Predict(_predict_request(TEST.images[:5], version=1), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Predict(_predict_request(TEST.images[:1], version=42), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Predict(_predict_request(TEST.images[:2000]), timeout=30)  # over max_images_per_request
    assert (
        _http(served, "/v1/models/mnist/versions/1:predict", {"instances": TEST.images[:2].tolist()})[0]
        == 200
    )

    def wanted(text: str) -> bool:
        ok = [
            labels
            for labels, value in prometheus.samples(text, "ray_mnist_requests_total")
            if labels.get("version") == "1"
            and labels.get("signature") == "serving_default"
            and value >= 3
            and labels.get("protocol") == "grpc"
            and labels.get("code") == "OK"
            and labels.get("model") == "mnist"
        ]
        return bool(ok) and bool(prometheus.samples(text, "ray_mnist_requests_rejected_total"))

    text = prometheus.scrape_until(wanted)
    assert wanted(text), text[-3000:]
    requests = prometheus.samples(text, "ray_mnist_requests_total")
    assert any(tags["code"] == "NOT_FOUND" and tags["version"] == "" for tags, _ in requests)
    assert any(
        tags["protocol"] == "rest" and tags["method"] == "predict" and tags["version"] == "1"
        for tags, _ in requests
    )
    assert any(tags["application"] == "mnist" and tags["deployment"] == "MnistServer" for tags, _ in requests)
    images = prometheus.samples(text, "ray_mnist_images_total")
    assert any(tags["version"] == "1" and v >= 17 for tags, v in images)  # 3 x 5 over gRPC + 2 over REST
    (rejected,) = [
        v
        for tags, v in prometheus.samples(text, "ray_mnist_requests_rejected_total")
        if tags["limit"] == "max_images_per_request"
    ]
    assert rejected >= 1
    batches = prometheus.samples(text, "ray_mnist_batch_size_images_count")
    assert any(
        tags["version"] == "1" and tags["signature"] == "serving_default" and v >= 1 for tags, v in batches
    )
    loaded = prometheus.samples(text, "ray_mnist_versions_loaded")
    assert any(tags["version"] == "1" and tags["state"] == "AVAILABLE" and v == 1 for tags, v in loaded)
    assert prometheus.samples(text, "ray_mnist_request_latency_ms_bucket")
    assert prometheus.samples(text, "ray_mnist_backend_latency_ms_bucket")
