"""Serve's autoscaling on this machine: serve_configs/autoscaling.yaml's deployment under steady
load through the front door goes from 1 replica to 2, and back to 1 once the load stops.

What is measured: the time from the load's start to the second replica running, the throughput
before (one replica) and after (two), the time from the load's end to one replica again, and
every request's outcome (none may fail: requests on the replica being removed are drained).
``run_scaling`` is shared with tests/integration/test_autoscaling.py; ``main`` runs it on a local
Ray of its own::

    .venv/bin/python -m bench.autoscaling --model-base-path /tmp/store --out bench/results/autoscaling.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "serve_configs" / "autoscaling.yaml"
CLIENTS = 8  # closed-loop single-image clients: 8 in flight on one replica, target 4 per replica


def replica_states(app: str = "mnist", deployment: str = "MnistServer") -> dict[str, int]:
    """Replicas of the deployment by state (RUNNING, STARTING, STOPPING, ...), from Serve."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(state): n for state, n in status.deployments[deployment].replica_states.items()}


def _wait(condition: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until ``condition()`` held (polled every 0.25 s), or None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def run_scaling(
    grpc_target: str,
    running: Callable[[], int],
    *,
    model: str = "mnist",
    clients: int = CLIENTS,
    up_timeout_s: float = 120.0,
    after_up_s: float = 10.0,
    down_timeout_s: float = 120.0,
    deadline_s: float = 10.0,
) -> dict[str, Any]:
    """Load ``grpc_target`` with ``clients`` single-image Predicts until ``running()`` (replicas
    RUNNING) reaches 2 and ``after_up_s`` more; then all but one client stop, and that one goes on
    (light load, below the scaling target) until one replica is left, so the replica that Serve
    takes away is drained with traffic still coming. Returns the figures."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from bench.loadgen import build_requests

    requests, _ = build_requests(model, 1)
    outcomes: list[tuple[float, float, str]] = []  # (sent, done) since the load started, code
    stop, stop_light = threading.Event(), threading.Event()
    started = time.monotonic()

    def client(index: int) -> None:
        done = stop_light if index == 0 else stop  # client 0 stays through the scale-down
        with grpc.insecure_channel(grpc_target) as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            n = index
            while not done.is_set():
                sent = time.monotonic() - started
                try:
                    predict(requests[n % len(requests)], timeout=deadline_s)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                outcomes.append((sent, time.monotonic() - started, code))
                n += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    down_s = None
    try:
        up_s = _wait(lambda: running() >= 2, up_timeout_s)
        if up_s is not None:
            time.sleep(after_up_s)
        stop.set()
        for thread in threads[1:]:
            thread.join(timeout=deadline_s + 5)
        load_s = time.monotonic() - started
        if up_s is not None:
            down_s = _wait(lambda: running() == 1, down_timeout_s)
            time.sleep(1.0)  # the light client's requests just after the drained replica has gone
    finally:
        stop.set()
        stop_light.set()
        for thread in threads:
            thread.join(timeout=deadline_s + 5)
    light = [o for o in outcomes if o[0] >= load_s]

    def rate(start_s: float, end_s: float) -> float | None:
        done = [o for o in outcomes if o[2] == "OK" and start_s <= o[1] < end_s]
        return round(len(done) / (end_s - start_s), 1) if end_s > start_s else None

    failed = [o for o in outcomes if o[2] != "OK"]
    return {
        "clients": clients,
        "requests": len(outcomes),
        "failed": len(failed),
        "failed_codes": sorted({o[2] for o in failed}),
        "scale_up_s": None if up_s is None else round(up_s, 1),
        "scale_down_s": None if down_s is None else round(down_s, 1),
        "load_s": round(load_s, 1),
        "requests_during_scale_down": len(light),
        "failed_during_scale_down": sum(o[2] != "OK" for o in light),
        # one replica: from 2 s in (warm) to the second replica; two: the last after_up_s - 2 s
        "img_per_s_one_replica": rate(2.0, up_s) if up_s else None,
        "img_per_s_two_replicas": rate(up_s + 2.0, load_s) if up_s else None,
    }


def deployment_options(config: Path = CONFIG) -> dict[str, Any]:
    """The config's deployment options (without its name), as ``MnistServer.options`` takes them."""
    app = yaml.safe_load(config.read_text())["applications"][0]
    return {key: value for key, value in app["deployments"][0].items() if key != "name"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscaling", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-base-path", type=Path, required=True, help="a store with a version (<path>/1/)"
    )
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from client.local import leftovers
    from client.local.ports import free_port, with_free_side_ports
    from ray_app.config import AppConfig
    from ray_app.deployment import MnistServer
    from ray_app.front_door import front_door_env, node_cpus

    config = yaml.safe_load(CONFIG.read_text())
    state_dir = leftovers.new_state_dir()
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(with_free_side_ports(front_door_env(node_cpus(), state_dir=state_dir)))
    grpc_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ours = psutil_children()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(
                port=grpc_port, grpc_servicer_functions=config["grpc_options"]["grpc_servicer_functions"]
            ),
        )
        app_args = {**config["applications"][0]["args"], "model_base_path": str(args.model_base_path)}
        serve.run(
            MnistServer.options(**deployment_options()).bind(AppConfig.model_validate(app_args).model_dump()),
            name="mnist",
            route_prefix="/",
        )
        if _wait(lambda: replica_states().get("RUNNING", 0) == 1, 120) is None:
            raise RuntimeError(f"not one replica running: {replica_states()}")
        figures = run_scaling(
            f"127.0.0.1:{grpc_port}", lambda: replica_states().get("RUNNING", 0), clients=args.clients
        )
    finally:
        ours += psutil_children()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        left = leftovers.wait_gone(lambda: [p for p in ours if p.is_running()], 30)
        leftovers.stop(left + leftovers.haproxy_processes(state_dir))
    figures["date"] = datetime.date.today().isoformat()
    figures["config"] = str(CONFIG.relative_to(REPO))
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["failed"] == 0 and figures["scale_down_s"] is not None else 1


def psutil_children() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


if __name__ == "__main__":
    sys.exit(main())
