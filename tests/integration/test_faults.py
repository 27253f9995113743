"""Faults under load, through the front door: a replica process killed with SIGKILL.

Two replicas of serve_configs/local.yaml's deployment behind HAProxy, four gRPC clients asking all
along. One replica is SIGKILLed: only requests on it may fail (in flight, or sent by HAProxy on its
connection to the replica before HAProxy saw that connection close: tests/integration/replica_kill.py
says how that is told apart); none that start after that, and Serve starts a replacement. HAProxy resends a request that could not
reach a replica to the other one, but not one whose replica died with it unanswered
(ray_app/front_door.py: retry-on conn-failure only, so a request that kills a replica is never
replayed onto the next).
"""

from __future__ import annotations

import grpc
import pytest
from tensorflow_serving.apis import predict_pb2

from ray_app.protocol.tensors import from_ndarray
from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from tests.integration.replica_kill import assert_only_the_victims_requests_failed, kill_a_replica_under_load
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 4


def test_killing_a_replica_under_load_fails_only_its_requests_in_flight(tmp_path, trained_export) -> None:
    store = tmp_path / "mnist"
    publish_copy(trained_export, store, 1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(load_mnist().test.images[:1], tensor_content=True))

    with local_serve() as ports:
        run_local_app(store, num_replicas=2)
        run = kill_a_replica_under_load(lambda: grpc.insecure_channel(ports.grpc_address), request, CLIENTS)
    print(f"replica kill: {run.summary()}")
    assert_only_the_victims_requests_failed(run, CLIENTS)
