"""One local Ray for a test module, with Serve behind the app's front door; everything it started is
stopped afterwards, and checked to be gone (Ray's processes, replicas, HAProxy, the serving ports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from client.local import leftovers
from client.local.ports import free_port, port_in_use, with_free_side_ports
from ray_app.front_door import HAPROXY_SWITCH
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


# The GCS marks a node dead after this many missed health checks (3 s apart; Ray's default is 5),
# and a dead node takes its actors and this process (the driver) with it. On a 2-core machine that
# two test clusters, TensorFlow training and replicas share, a starved raylet can miss 5 in a row:
# a CI run lost a module, most likely that way (its replica stopped answering, then its pytest
# worker died; no Ray log survived to confirm it).
HEALTH_CHECK_FAILURE_THRESHOLD = 20


def fresh_side_ports() -> None:
    """Pick HAProxy mode's side ports (stats, metrics, the fallback proxy) again, in this process's
    environment, just before a cluster starts (its processes inherit them). Picked once per test
    process, a port free then can be taken minutes later, before a later module's cluster binds it:
    Ray binds its workers' gRPC servers to port 0, so they land anywhere in the ephemeral range
    (the proxy then fails with "Failed to bind to address")."""
    side = with_free_side_ports({HAPROXY_SWITCH: os.environ.get(HAPROXY_SWITCH, "")})
    del side[HAPROXY_SWITCH]
    os.environ.update(side)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, free_after: tuple[int, ...] = (), **init_kwargs) -> Iterator[str]:
    """``ray.init`` a new local cluster (no dashboard); yields its node id. Shut down on exit (also
    when starting it failed half-way), and checked gone, with ``free_after``'s ports unbound."""
    import ray

    fresh_side_ports()
    try:
        system_config = {"health_check_failure_threshold": HEALTH_CHECK_FAILURE_THRESHOLD}
        init_kwargs = {"include_dashboard": False, "_system_config": system_config, **init_kwargs}
        ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
        node_id = ray.get_runtime_context().get_node_id()
    except BaseException:
        ray.shutdown()
        raise
    try:
        yield node_id
    finally:
        ours = cluster_processes(node_id)
        ray.shutdown()
        assert_nothing_left(ours, list(free_after))


@dataclass(frozen=True)
class JobCluster:
    dashboard: str  # the job API's address
    gcs_address: str
    temp_dir: str

    def processes(self) -> list[psutil.Process]:
        """Its head processes (they name its temp directory or GCS address) and all they started."""
        found = [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(self.temp_dir in a or self.gcs_address in a for a in p.info["cmdline"] or [])
        ]
        for process in list(found):
            with contextlib.suppress(psutil.NoSuchProcess):
                found += process.children(recursive=True)
        return list({p.pid: p for p in found}.values())


@contextlib.contextmanager
def local_job_cluster(num_cpus: int = 2) -> Iterator[JobCluster]:
    """``ray start --head`` a cluster with its dashboard (the job API) on free loopback ports, and
    connect this process to it. ``ray start`` rather than ``ray.init``: only it can move the dashboard
    agent off its fixed default port (52365), which another cluster of this test run may hold (an
    agent that cannot bind it cannot take jobs: "No available agent to submit job"). Its own temp
    directory keeps other ``ray.init`` calls on this machine from finding it. Every process of it is
    stopped (not ``ray stop``, which would end the other clusters too) and checked gone on exit."""
    import ray

    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    cluster = JobCluster(
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        gcs_address=f"127.0.0.1:{gcs_port}",
        temp_dir=tempfile.mkdtemp(prefix="/tmp/rayjc-"),  # short: Ray's unix sockets live under it
    )
    start = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port), "--num-cpus", str(num_cpus), "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(free_port()),
        "--temp-dir", cluster.temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    fresh_side_ports()
    # `ray start` turns Ray's token auth on by default, this process's ray.init does not (RAY_FACTS:
    # Operations): a throwaway cluster on loopback, it runs without, as ray.init's clusters here do.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_health_check_failure_threshold": str(HEALTH_CHECK_FAILURE_THRESHOLD),
    }
    try:
        subprocess.run(start, check=True, capture_output=True, text=True, timeout=120, env=env)
        ray.init(address=cluster.gcs_address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        ours = cluster.processes()
        leftovers.stop(ours, grace_s=5)  # then SIGKILL: nothing of a test cluster needs saving
        try:
            assert_nothing_left(ours, [gcs_port, dashboard_port, agent_port])
        finally:
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_serve(num_cpus: int = 2) -> Iterator[LocalServe]:
    """A local Ray with Serve on free gRPC/HTTP ports, TF Serving's services registered as in our
    configs, behind the front door the suite's environment selects (HAProxy by default)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    ports = LocalServe(grpc_port=free_port(), http_port=free_port())
    with local_ray(num_cpus, free_after=(ports.grpc_port, ports.http_port)):
        try:
            serve.start(
                http_options={"host": "127.0.0.1", "port": ports.http_port},
                grpc_options=gRPCOptions(port=ports.grpc_port, grpc_servicer_functions=SERVICERS),
            )
            yield ports
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()


def run_local_app(
    store: Path,
    *,
    user_config: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``serve.run`` serve_configs/local.yaml's deployment as the app ``mnist`` at ``/``, serving
    ``store``: its options, ``user_config`` and ``args``, each with these overrides (an option
    overridden with None is dropped). Needs a running Serve (:func:`local_serve`). Returns the
    deployment options and the args it ran with."""
    from ray import serve

    from ray_app.config import AppConfig
    from ray_app.deployment import MnistServer

    app_yaml = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]
    deployment = {key: value for key, value in app_yaml["deployments"][0].items() if key != "name"}
    deployment.update(options)
    deployment = {key: value for key, value in deployment.items() if value is not None}
    deployment["user_config"] = {**deployment["user_config"], **(user_config or {})}
    app_args = {**app_yaml["args"], "model_base_path": str(store), **(args or {})}
    serve.run(
        MnistServer.options(**deployment).bind(AppConfig.model_validate(app_args).model_dump()),
        name="mnist",
        route_prefix="/",
    )
    return deployment, app_args
