"""The TF Serving stand-in, driven like TF Serving's own integration tests.

One server process per module: installed as ``tensorflow_model_server`` on a temporary bin
directory, started on a free port, awaited through a readiness probe (GetModelStatus until a
version is AVAILABLE), killed at exit. Clients are the stock ``tensorflow-serving-api`` stubs.

The tests run in file order: the ones that change the model store (new, broken version, config
reload) and the SIGTERM test come last.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from client.local.ports import free_port
from ray_app import model_store
from tests.fake_tfserving import install_fake_tfserving
from tests.fake_tfserving import server as fake_server
from tests.polling import wait_for

MODEL = "mnist"
POLL_S = 1
STARTUP_DEADLINE_S = 90.0
RPC_TIMEOUT_S = 5.0
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


@dataclasses.dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    base_path: Path
    log_path: Path
    prediction: prediction_service_pb2_grpc.PredictionServiceStub
    models: model_service_pb2_grpc.ModelServiceStub

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _publish(export: Path, base_path: Path, version: int) -> None:
    """Publish like the trainer: fill a hidden staging dir, then rename it into place."""
    with model_store.staging_dir(base_path) as staged:
        shutil.copytree(export, staged, dirs_exist_ok=True)
        model_store.publish(staged, base_path, version)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def _request(
    inputs: dict[str, np.ndarray], signature: str = "", version: int | None = None, name: str = MODEL
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
    if version is not None:
        request.model_spec.version.value = version
    for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
    return request


def _status(server: RunningServer, version: int | None = None) -> dict[int, tuple[int, int]]:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=MODEL))
    if version is not None:
        request.model_spec.version.value = version
    response = server.models.GetModelStatus(request, timeout=RPC_TIMEOUT_S)
    return {s.version: (s.state, s.status.error_code) for s in response.model_version_status}


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained MNIST SavedModel with both signatures and warmup records."""
    from training.export import save_model, write_metrics, write_warmup_requests
    from training.model import build_model

    path = tmp_path_factory.mktemp("export") / "model"
    save_model(build_model(), path)
    write_warmup_requests(path, MODEL, _images(4, seed=1))
    write_metrics(path, {"test_accuracy": 0.1})
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exported_model: Path) -> Iterator[RunningServer]:
    base_path = tmp_path_factory.mktemp("store") / MODEL
    _publish(exported_model, base_path, 1)
    _publish(exported_model, base_path, 2)
    # Noise the server must ignore: an unfinished export, a non-integer name, a version without graph.
    shutil.copytree(exported_model, base_path / ".staging-leftover")
    (base_path / "notes").mkdir()
    shutil.copytree(exported_model / "variables", base_path / "9" / "variables")

    executable = install_fake_tfserving(tmp_path_factory.mktemp("bin"))
    port = free_port()
    log_path = base_path.parent / "server.log"
    command = [
        str(executable),
        f"--port={port}",
        f"--model_name={MODEL}",
        f"--model_base_path={base_path}",
        f"--file_system_poll_wait_seconds={POLL_S}",
        # The real default retries a failed load 5 times, a minute apart: keep it short here.
        "--max_num_load_retries=1",
        "--load_retry_interval_micros=100000",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"localhost:{port}")
    running = RunningServer(
        process,
        port,
        base_path,
        log_path,
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{running.log()[-4000:]}")
        try:
            return any(state == AVAILABLE for state, _ in _status(running).values())
        except grpc.RpcError:
            return False

    try:
        wait_for(ready, STARTUP_DEADLINE_S, "the model to become AVAILABLE")
        yield running
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected_rc", "message"),
    [
        (["--model_name=m", "--model_base_path=/x", "--xyz=1"], 1, "unknown command line flag 'xyz'"),
        (["--enable_batching=maybe", "--model_base_path=/x"], 1, "couldn't interpret value maybe"),
        (["--model_name=m"], 255, "model_base_path and server_options.model_config_file are empty"),
        (["--port=0", "--model_base_path=/x"], 255, "--port=0 disables tcp; give --grpc_socket_path"),
        (["--port=70000", "--model_base_path=/x"], 255, "--port must be a tcp port"),
        (["--model_config_file=/nonexistent/models.config"], 255, "cannot read model config file"),
        (["--model_base_path=/x", "--rest_api_port=8501"], 255, "--rest_api_port is not emulated"),
    ],
    ids=[
        "unknown-flag",
        "bad-bool",
        "no-model",
        "port-0-without-socket",
        "port-too-big",
        "missing-config",
        "rest",
    ],
)
def test_bad_command_line_exits_nonzero(
    tmp_path: Path, args: list[str], expected_rc: int, message: str
) -> None:
    executable = install_fake_tfserving(tmp_path)
    result = subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == expected_rc
    assert message in (result.stdout + result.stderr).lower()


def test_model_config_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    path.write_text(
        """
        model_config_list {
          config { name: "mnist" base_path: "/models/mnist" model_platform: "tensorflow"
                   model_version_policy { specific { versions: 2 versions: 3 } }
                   version_labels { key: "stable" value: 2 } }
          config { name: "other" base_path: "/models/other" }
        }
        """
    )
    config = fake_server.config_from_options({"model_config_file": str(path)})
    mnist, other = config.model_config_list.config
    assert fake_server.aspired_versions(mnist.model_version_policy, [1, 2, 3, 4]) == {2, 3}
    assert dict(mnist.version_labels) == {"stable": 2}
    assert fake_server.aspired_versions(other.model_version_policy, [1, 2, 3, 4]) == {4}


# --- serving the store as it is at startup (versions 1 and 2, default policy: latest 1) ----------


def test_status_reports_latest_version_only(server: RunningServer) -> None:
    assert _status(server) == {2: (AVAILABLE, 0)}
    assert "Running gRPC ModelServer at 0.0.0.0:" in server.log()
    with pytest.raises(grpc.RpcError) as error:
        _status(server, version=1)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "Could not find version 1 of model mnist"


def test_predict_serving_default_matches_the_model(server: RunningServer, exported_model: Path) -> None:
    images = _images(3)
    response = server.prediction.Predict(_request({"images": images}), timeout=RPC_TIMEOUT_S)

    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    assert set(response.outputs) == {"probabilities", "classes"}
    assert len(response.outputs["probabilities"].float_val) == 30  # typed fields, as the real server
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    classes = tf.make_ndarray(response.outputs["classes"])
    expected = tf.saved_model.load(str(exported_model)).signatures["serving_default"](
        images=tf.constant(images)
    )
    np.testing.assert_allclose(probabilities, expected["probabilities"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(classes, expected["classes"].numpy())
    assert classes.dtype == np.int64


def test_predict_images_signature_with_output_filter(server: RunningServer) -> None:
    flat = _images(2).reshape(2, 784).astype(np.float32) / 255.0
    request = _request({"images": flat}, signature="predict_images", version=2)
    request.output_filter.append("scores")
    response = server.prediction.Predict(request, timeout=RPC_TIMEOUT_S)

    assert response.model_spec.signature_name == "predict_images"
    scores = tf.make_ndarray(response.outputs["scores"])
    assert scores.shape == (2, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("request_kwargs", "code", "details"),
    [
        ({"name": "nope"}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"),
        ({"version": 1}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(mnist, 1)"),
        ({"version": 9}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(mnist, 9)"),
        (
            {"signature": "nope"},
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
        (
            {"inputs": {"images": np.zeros((1, 28, 28), np.float32)}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expects arg[0] to be uint8 but float is provided",
        ),
        (
            {"inputs": {"images": np.zeros((1, 784), np.uint8)}},
            grpc.StatusCode.INVALID_ARGUMENT,
            'input tensor "images" has shape [1,784] but the signature expects [?,28,28]',
        ),
        ({"inputs": {}}, grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {images}."),
        (
            {"inputs": {"images": np.zeros((1, 28, 28), np.uint8), "labels": np.zeros(1, np.int64)}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Sent extra: {labels}.",
        ),
        (
            {"inputs": {"pixels": np.zeros((1, 28, 28), np.uint8)}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "input tensor alias not found in signature: pixels.",
        ),
    ],
    ids=[
        "unknown-model",
        "unloaded-version",
        "missing-version",
        "unknown-signature",
        "wrong-dtype",
        "wrong-shape",
        "missing-input",
        "extra-input",
        "renamed-input",
    ],
)
def test_predict_errors(
    server: RunningServer, request_kwargs: dict, code: grpc.StatusCode, details: str
) -> None:
    inputs = request_kwargs.pop("inputs", {"images": _images(1)})
    with pytest.raises(grpc.RpcError) as error:
        server.prediction.Predict(_request(inputs, **request_kwargs), timeout=RPC_TIMEOUT_S)
    assert error.value.code() == code
    assert details in error.value.details()


def test_get_model_metadata_returns_the_saved_signatures(server: RunningServer) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name=MODEL), metadata_field=["signature_def"]
    )
    response = server.prediction.GetModelMetadata(request, timeout=RPC_TIMEOUT_S)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)

    assert response.model_spec.version.value == 2
    assert {"serving_default", "predict_images"} <= set(signature_map.signature_def)
    default = signature_map.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert default.inputs["images"].dtype == types_pb2.DT_UINT8
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1, 28, 28]
    assert default.outputs["classes"].dtype == types_pb2.DT_INT64
    flat = signature_map.signature_def["predict_images"]
    assert [d.size for d in flat.inputs["images"].tensor_shape.dim] == [-1, 784]

    request.metadata_field[:] = ["nope"]
    with pytest.raises(grpc.RpcError) as error:
        server.prediction.GetModelMetadata(request, timeout=RPC_TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the store changes under the running server --------------------------------------------------


def test_new_version_is_picked_up_within_the_poll_interval(
    server: RunningServer, exported_model: Path
) -> None:
    _publish(exported_model, server.base_path, 3)

    def serves_three() -> bool:
        response = server.prediction.Predict(_request({"images": _images(1)}), timeout=RPC_TIMEOUT_S)
        return response.model_spec.version.value == 3

    waited_s = wait_for(serves_three, POLL_S + 15, "version 3 to answer")
    print(f"version 3 answered {waited_s:.1f} s after publishing")
    wait_for(lambda: _status(server) == {2: (END, 0), 3: (AVAILABLE, 0)}, 10, "version 2 to unload")


def test_broken_version_is_reported_and_the_last_good_one_keeps_serving(server: RunningServer) -> None:
    with model_store.staging_dir(server.base_path) as staged:
        (staged / "saved_model.pb").write_bytes(b"not a SavedModel")
        model_store.publish(staged, server.base_path, 4)

    def failed() -> bool:
        return _status(server).get(4) == (END, grpc.StatusCode.DATA_LOSS.value[0])

    wait_for(failed, POLL_S + 15, "version 4 to fail loading")
    assert _status(server)[3] == (AVAILABLE, 0)
    response = server.prediction.Predict(_request({"images": _images(1)}), timeout=RPC_TIMEOUT_S)
    assert response.model_spec.version.value == 3
    log = server.log()
    assert "Loading servable: {name: mnist version: 4} failed: DATA_LOSS: Can't parse" in log
    assert "Retrying of Loading servable: {name: mnist version: 4} retry: 1" in log


def test_reload_config_with_specific_versions_and_labels(server: RunningServer) -> None:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name=MODEL, base_path=str(server.base_path))
    model.model_version_policy.specific.versions.extend([2, 3])
    model.version_labels["stable"] = 2
    model.version_labels["canary"] = 3
    reply = server.models.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), timeout=30
    )
    assert reply.status.error_code == 0

    for label, version in [("stable", 2), ("canary", 3)]:
        request = _request({"images": _images(1)})
        request.model_spec.version_label = label
        response = server.prediction.Predict(request, timeout=RPC_TIMEOUT_S)
        assert response.model_spec.version.value == version
    request.model_spec.version_label = "nope"
    with pytest.raises(grpc.RpcError) as error:
        server.prediction.Predict(request, timeout=RPC_TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "Unrecognized servable version label: nope"

    model.version_labels["canary"] = 9
    with pytest.raises(grpc.RpcError) as error:
        server.models.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=30
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Request to assign label to version 9 of model mnist" in error.value.details()


def test_sigterm_stops_the_server_cleanly(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
