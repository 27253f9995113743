"""One local Ray for a test module, with Serve behind the app's front door; everything it started is
stopped afterwards, and checked to be gone (Ray's processes, replicas, HAProxy, the serving ports)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from ray_app import leftovers
from ray_app.ports import free_port, port_in_use
from tests.conftest import HAPROXY_STATE_DIR_VARIABLE

LOCAL_CONFIG = Path(__file__).resolve().parents[2] / "serve_configs" / "local.yaml"

SERVICERS = [
    "ray_app.grpc_servicers.add_PredictionServiceServicer_to_server",
    "ray_app.grpc_servicers.add_ModelServiceServicer_to_server",
    "ray_app.grpc_servicers.add_GRPCInferenceServiceServicer_to_server",
]


@dataclass(frozen=True)
class LocalServe:
    grpc_port: int
    http_port: int

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def cluster_processes(node_id: str) -> list[psutil.Process]:
    """The processes of the local cluster with this node id, and everything they started."""
    heads = [
        p for p in psutil.process_iter(["cmdline"]) if any(node_id in a for a in p.info["cmdline"] or [])
    ]
    found = list(heads)
    for head in heads:
        with contextlib.suppress(psutil.NoSuchProcess):
            found += head.children(recursive=True)
    return found


def assert_nothing_left(ours: list[psutil.Process], ports: list[int], timeout_s: float = 30) -> None:
    """None of ``ours`` alive, no HAProxy of this test run, none of ``ports`` bound."""
    state_dir = os.environ.get(HAPROXY_STATE_DIR_VARIABLE)

    def alive() -> list[psutil.Process]:
        running = []
        for process in ours:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
        return running + (leftovers.haproxy_processes(state_dir) if state_dir else [])

    left = leftovers.wait_gone(alive, timeout_s)
    leftovers.stop(left)  # so one failure does not cascade into the next module
    assert not left, f"still running after shutdown: {leftovers.describe(left)}"
    busy = [port for port in ports if port_in_use(port)]
    assert not busy, f"ports still bound after shutdown: {busy}"


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, **init_kwargs) -> Iterator[str]:
    """``ray.init`` a local cluster (no dashboard unless ``include_dashboard=True``); yields its
    node id. Shut down and checked gone on exit."""
    import ray

    ray.init(num_cpus=num_cpus, **{"include_dashboard": False, **init_kwargs})
    node_id = ray.get_runtime_context().get_node_id()
    try:
        yield node_id
    finally:
        ours = cluster_processes(node_id)
        ray.shutdown()
        assert_nothing_left(ours, [])


@contextlib.contextmanager
def local_serve(num_cpus: int = 2) -> Iterator[LocalServe]:
    """A local Ray with Serve on free gRPC/HTTP ports, TF Serving's services registered as in our
    configs, behind the front door the suite's environment selects (HAProxy by default)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    ports = LocalServe(grpc_port=free_port(), http_port=free_port())
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": ports.http_port},
            grpc_options=gRPCOptions(port=ports.grpc_port, grpc_servicer_functions=SERVICERS),
        )
        yield ports
    finally:
        ours = cluster_processes(node_id)
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        assert_nothing_left(ours, [ports.grpc_port, ports.http_port])


def run_local_app(
    store: Path,
    *,
    user_config: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``serve.run`` serve_configs/local.yaml's deployment as the app ``mnist`` at ``/``, serving
    ``store``: its options, ``user_config`` and ``args``, each with these overrides. Needs a
    running Serve (:func:`local_serve`). Returns the deployment options and the args it ran with."""
    from ray import serve

    from ray_app.config import AppConfig
    from ray_app.deployment import MnistServer

    app_yaml = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]
    deployment = {key: value for key, value in app_yaml["deployments"][0].items() if key != "name"}
    deployment.update(options)
    deployment["user_config"] = {**deployment["user_config"], **(user_config or {})}
    app_args = {**app_yaml["args"], "model_base_path": str(store), **(args or {})}
    serve.run(
        MnistServer.options(**deployment).bind(AppConfig.model_validate(app_args).model_dump()),
        name="mnist",
        route_prefix="/",
    )
    return deployment, app_args
