"""A head that can fail: the GCS server killed and brought back while the app serves under load.

One local Ray whose GCS keeps its tables in a real Redis (Debian's ``redis-server``, started and
stopped here), as the RayService does with serve_configs/kuberay/redis.yaml; Serve behind the
HAProxy front door; four gRPC clients asking all along. The ``gcs_server`` process is SIGKILLed
and, some seconds later, started again on the same port, reloading its tables from Redis, the way
KubeRay brings up a new head. Serve's data path (HAProxy -> replica -> model) does not call the
GCS, so no request may fail during the outage or after it; afterwards the control plane answers
again (``serve.status``) and a version published after the outage rolls out.
"""

from __future__ import annotations

import collections
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import grpc
import psutil
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from ray_app.ports import free_port
from ray_app.protocol.tensors import from_ndarray
from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from training.data import load_mnist

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="needs Debian's redis-server (apt-get install redis-server; .ci/run installs it)",
    ),
]

CLIENTS = 4
OUTAGE_S = 8.0


@dataclass(frozen=True)
class Outcome:
    started_s: float
    ended_s: float
    code: str
    version: int


def _redis(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
        connection.sendall(command + b"\r\n")
        return connection.recv(64)


def _redis_answers(port: int) -> bool:
    try:
        return _redis(port, b"PING").startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    """A Redis on a free loopback port, with its data in a temporary directory; stopped after."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--save", "", "--appendonly", "yes", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _redis_answers(port):
            assert process.poll() is None, f"redis-server exited with {process.returncode}"
            assert time.monotonic() < deadline, "redis-server did not answer PING within 20 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        assert (
            not psutil.pid_exists(process.pid) or psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
        )


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_serving_survives_the_gcs_going_down_and_coming_back(redis, tmp_path, trained_export, monkeypatch):
    import ray
    from ray import serve

    store = tmp_path / "mnist"
    publish_copy(trained_export, store, 1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(load_mnist().test.images[:1], tensor_content=True))

    monkeypatch.setenv("RAY_REDIS_ADDRESS", redis)  # read when ray.init starts the head
    with local_serve() as ports:
        node = ray._private.worker._global_node
        run_local_app(store, num_replicas=1)
        keys = int(_redis(int(redis.rsplit(":", 1)[1]), b"DBSIZE").strip().lstrip(b":"))
        assert keys > 0, "the GCS wrote nothing to Redis: it is not using it"
        outcomes: list[Outcome] = []
        stop = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(ports.grpc_address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while not stop.is_set():
                    started_s = time.monotonic()
                    try:
                        answer = stub.Predict(request, timeout=30)
                        code, version = "OK", answer.model_spec.version.value
                    except grpc.RpcError as exc:
                        code, version = exc.code().name, 0
                    outcomes.append(Outcome(started_s, time.monotonic(), code, version))
                    time.sleep(0.02)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(3)
            gcs = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
            assert len(gcs) == 1, gcs
            killed_s = time.monotonic()
            node.kill_gcs_server()  # SIGKILL, then waits for it to be gone
            assert not gcs[0].is_running() or gcs[0].status() == psutil.STATUS_ZOMBIE
            time.sleep(OUTAGE_S)
            restarted_s = time.monotonic()
            node.start_gcs_server()  # same port, tables reloaded from Redis
            _wait_for(lambda: serve.status().applications["mnist"].status == "RUNNING", 60, "serve.status")
            controls_s = time.monotonic()
            publish_copy(trained_export, store, 2)
            _wait_for(lambda: outcomes and outcomes[-1].version == 2, 60, "version 2 to be served")
            rolled_out_s = time.monotonic()
            time.sleep(2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

    during = [o for o in outcomes if o.ended_s >= killed_s and o.started_s <= restarted_s]
    failed = [o for o in outcomes if o.code != "OK"]
    codes = collections.Counter(o.code for o in failed)
    print(
        f"GCS outage {restarted_s - killed_s:.1f} s: {len(outcomes)} requests, {len(during)} during the "
        f"outage, failed by code {dict(codes)}; control plane back {controls_s - restarted_s:.1f} s after "
        f"the restart; version 2 served {rolled_out_s - controls_s:.1f} s after its publish"
    )
    assert len(during) > 50, "too few requests during the outage to show anything"
    assert not failed, f"failed: {failed[:5]}"
    assert {o.version for o in outcomes if o.started_s > rolled_out_s} == {2}
