"""Serve's autoscaling through the front door: serve_configs/autoscaling.yaml's deployment goes
from 1 replica to 2 under steady load and back to 1 under light load after it (so the replica taken
away drains with traffic still coming), and no request fails on the way
(the load and the figures: bench/autoscaling.py, shared with the benchmark)."""

from __future__ import annotations

import pytest

from bench.autoscaling import CONFIG, deployment_options, replica_states, run_scaling
from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_one_replica_becomes_two_under_load_and_one_again_after_it(tmp_path, trained_export):
    store = tmp_path / "mnist"
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        options = deployment_options(CONFIG)
        run_local_app(store, **{**options, "num_replicas": None})
        wait_for(lambda: replica_states().get("RUNNING", 0) == 1, 120, "one replica running")
        # 4 s of load on both replicas once the second runs (the benchmark keeps it 10 s, for its figures).
        figures = run_scaling(ports.grpc_address, lambda: replica_states().get("RUNNING", 0), after_up_s=4)
    print(f"autoscaling: {figures}")
    assert figures["scale_up_s"] is not None, f"no second replica under load: {figures}"
    assert figures["scale_down_s"] is not None, f"not back to one replica after the load: {figures}"
    assert figures["requests"] > 0 and figures["failed"] == 0, figures
    assert figures["requests_during_scale_down"] > 50, figures  # a replica drained under traffic
