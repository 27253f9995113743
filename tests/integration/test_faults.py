"""Faults under load, through the front door: a replica process killed with SIGKILL.

Two replicas of serve_configs/local.yaml's deployment behind HAProxy, four gRPC clients asking all
along. One replica is SIGKILLed: only requests on it may fail (in flight, or sent by HAProxy on its
connection to the replica before HAProxy saw that connection close: at most one per client); none
that start after that, and Serve starts a replacement. HAProxy resends a request that could not
reach a replica to the other one, but not one whose replica died with it unanswered
(ray_app/front_door.py: retry-on conn-failure only, so a request that kills a replica is never
replayed onto the next).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from ray_app.protocol.tensors import from_ndarray
from tests.conftest import publish_copy
from tests.integration.cluster import cluster_processes, local_serve, run_local_app
from tests.polling import wait_for
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REPLICA_CLASS = "ServeReplica:mnist:MnistServer"
CLIENTS = 4
NOTICE_S = 0.1  # how long HAProxy may take, on this loaded machine, to see a replica's connection close


@dataclass(frozen=True)
class Outcome:
    started_s: float
    ended_s: float
    code: str


def _exited(pid: int, timeout_s: float = 10.0) -> float:
    """The monotonic time at which process ``pid`` has exited (a zombie or reaped), polled every ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic()
        except psutil.NoSuchProcess:
            return time.monotonic()
        time.sleep(0.001)
    pytest.fail(f"process {pid} still running {timeout_s} s after SIGKILL")


def _replica_pids() -> set[int]:
    """Process ids of the app's replicas in this test's cluster (by their Ray process title)."""
    import ray

    pids = set()
    for process in cluster_processes(ray.get_runtime_context().get_node_id()):
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                title = process.cmdline()
                if title and title[0].startswith("ray::" + REPLICA_CLASS):
                    pids.add(process.pid)
    return pids


def test_killing_a_replica_under_load_fails_only_its_requests_in_flight(tmp_path, trained_export) -> None:
    store = tmp_path / "mnist"
    publish_copy(trained_export, store, 1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(load_mnist().test.images[:1], tensor_content=True))

    with local_serve() as ports:
        run_local_app(store, num_replicas=2)
        wait_for(lambda: len(_replica_pids()) == 2, 120, "two replicas running")
        outcomes: list[Outcome] = []
        stop = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(ports.grpc_address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while not stop.is_set():
                    started_s = time.monotonic()
                    try:
                        stub.Predict(request, timeout=30)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    outcomes.append(Outcome(started_s, time.monotonic(), code))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(3)  # both replicas take traffic
        victim = min(_replica_pids())
        killed_s = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        gone_s = _exited(victim)  # from here on its sockets are closed
        wait_for(
            lambda: len(_replica_pids()) == 2 and victim not in _replica_pids(),
            120,
            "Serve to replace the killed replica",
        )
        replaced_s = time.monotonic()
        time.sleep(3)  # traffic over the replacement too
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    failed = [o for o in outcomes if o.code != "OK"]
    # On the victim: not answered before the kill, and sent before HAProxy could know it was gone
    # (its process exited, then HAProxy's next poll sees the closed connection: a request HAProxy
    # wrote to that connection in between met a dead replica, as one in flight did).
    noticed_s = gone_s + NOTICE_S
    in_flight = [o for o in failed if o.started_s <= noticed_s and o.ended_s >= killed_s]
    later = [o for o in failed if o not in in_flight]
    codes = collections.Counter(o.code for o in failed)
    after = [o for o in outcomes if o.started_s > noticed_s]
    print(
        f"replica kill: {len(outcomes)} requests, {len(after)} after the replica was gone "
        f"({(gone_s - killed_s) * 1000:.0f} ms after SIGKILL), failed by code {dict(codes)}; "
        f"replaced after {replaced_s - killed_s:.1f} s"
    )
    assert not later, f"requests that were not in flight on the killed replica failed: {later[:5]}"
    assert len(in_flight) <= CLIENTS  # at most one request per client can be in flight
    assert len(after) > 50 and all(o.code == "OK" for o in after)
