"""Operations under load, through the HAProxy front door: the head's GCS fails, old versions are
removed. Four gRPC clients ask all along; no request may fail.

One local Ray whose GCS keeps its tables in a real Redis (Debian's ``redis-server``, started and
stopped here), as the RayService does with serve_configs/kuberay/redis.yaml.

- The ``gcs_server`` process is SIGKILLed and, some seconds later, started again on the same port,
  reloading its tables from Redis, the way KubeRay brings up a new head. Serve's data path
  (HAProxy -> replica -> model) does not call the GCS, so requests keep being answered; afterwards
  the control plane answers again (``serve.status``) and a version published after the outage
  rolls out.
- Retention (training/retention.py) removes old versions while the app serves, protected by what
  the running app reports loaded.
"""

from __future__ import annotations

import collections
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from client.local.ports import free_port
from ray_app import model_store
from ray_app.protocol.tensors import from_ndarray
from tests.conftest import publish_copy
from tests.integration.cluster import LocalServe, local_serve, run_local_app
from tests.polling import wait_for
from training import retention
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
def redis_port(tmp_path_factory) -> Iterator[int]:
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
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass(frozen=True)
class App:
    ports: LocalServe
    store: Path


@pytest.fixture(scope="module")
def app(redis_port, tmp_path_factory, trained_export) -> Iterator[App]:
    """local.yaml's app (one replica) on a Ray whose GCS stores its tables in the module's Redis."""
    store = tmp_path_factory.mktemp("operations") / "mnist"
    publish_copy(trained_export, store, 1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_REDIS_ADDRESS", f"127.0.0.1:{redis_port}")  # read when ray.init starts the head
        with local_serve() as ports:
            run_local_app(store, num_replicas=1)
            yield App(ports, store)


class Load:
    """``CLIENTS`` gRPC clients asking for one digit each, in a loop, until the block ends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._request = predict_pb2.PredictRequest()
        self._request.model_spec.name = "mnist"
        self._request.inputs["images"].CopyFrom(
            from_ndarray(load_mnist().test.images[:1], tensor_content=True)
        )
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self._stop.is_set():
                started_s = time.monotonic()
                try:
                    answer = stub.Predict(self._request, timeout=30)
                    code, version = "OK", answer.model_spec.version.value
                except grpc.RpcError as exc:
                    code, version = exc.code().name, 0
                self.outcomes.append(Outcome(started_s, time.monotonic(), code, version))
                time.sleep(0.02)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def failed(self) -> collections.Counter[str]:
        return collections.Counter(o.code for o in self.outcomes if o.code != "OK")


def test_serving_survives_the_gcs_going_down_and_coming_back(app, redis_port, trained_export):
    import ray
    from ray import serve

    node = ray._private.worker._global_node
    keys = int(_redis(redis_port, b"DBSIZE").strip().lstrip(b":"))
    assert keys > 0, "the GCS wrote nothing to Redis: it is not using it"
    new_version = model_store.next_version(app.store)
    with Load(app.ports.grpc_address) as load:
        time.sleep(3)
        gcs = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
        assert len(gcs) == 1, gcs
        killed_s = time.monotonic()
        node.kill_gcs_server()  # SIGKILL, then waits for it to be gone
        assert not gcs[0].is_running() or gcs[0].status() == psutil.STATUS_ZOMBIE
        time.sleep(OUTAGE_S)
        restarted_s = time.monotonic()
        node.start_gcs_server()  # same port, tables reloaded from Redis
        wait_for(lambda: serve.status().applications["mnist"].status == "RUNNING", 60, "serve.status")
        controls_s = time.monotonic()
        publish_copy(trained_export, app.store, new_version)
        wait_for(lambda: load.outcomes[-1].version == new_version, 60, f"version {new_version} to be served")
        rolled_out_s = time.monotonic()
        time.sleep(2)

    during = [o for o in load.outcomes if o.ended_s >= killed_s and o.started_s <= restarted_s]
    print(
        f"GCS outage {restarted_s - killed_s:.1f} s: {len(load.outcomes)} requests, {len(during)} during "
        f"the outage, failed by code {dict(load.failed())}; control plane back "
        f"{controls_s - restarted_s:.1f} s after the restart; version {new_version} served "
        f"{rolled_out_s - controls_s:.1f} s after its publish"
    )
    assert len(during) > 50, "too few requests during the outage to show anything"
    assert not load.failed()
    assert {o.version for o in load.outcomes if o.started_s > rolled_out_s} == {new_version}


def test_retention_removes_old_versions_while_serving(app, trained_export):
    first_new = model_store.next_version(app.store)
    for version in range(first_new, first_new + 3):
        publish_copy(trained_export, app.store, version)
    newest = first_new + 2
    url = app.ports.http
    with Load(app.ports.grpc_address) as load:
        wait_for(
            lambda: load.outcomes and load.outcomes[-1].version == newest, 60, f"version {newest} served"
        )
        report = retention.apply(app.store, retention.Policy(keep_versions=1), [url])
        time.sleep(3)  # the replica's next store polls, under load
        after_s = time.monotonic()
        time.sleep(2)

    kept = model_store.list_versions(app.store)
    print(f"retention under load: kept {report.kept_versions}, removed {report.removed_versions}; "
          f"{len(load.outcomes)} requests, failed by code {dict(load.failed())}")  # fmt: skip
    # local.yaml keeps the newest 2 loaded (num_versions): the app reports both, so both stay.
    assert kept == [newest - 1, newest]
    assert report.removed_versions and all(v < newest - 1 for v in report.removed_versions)
    assert any(f"loaded by {url}" in why for why in report.kept_versions[newest - 1])
    assert not load.failed()
    assert {o.version for o in load.outcomes if o.started_s > after_s} == {newest}
