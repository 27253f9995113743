"""The model store and the local Ray + Serve the check watches (front door environment, metrics
export port, ``serve_configs/local.yaml`` deployed through Serve's REST API)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml

from bench.dashboard.common import (
    MODEL_NAME,
    PREDICT,
    REPO,
    RPC_TIMEOUT_S,
    SD_FILE,
    SERVE_CONFIG,
    alive,
    http_json,
)
from bench.dashboard.traffic import predict_request, raw, serialize
from client.local import leftovers
from client.local.ports import free_port, with_free_side_ports
from ray_app.front_door import front_door_env, node_cpus


def publish_dir(source: Path, store: Path, version: int) -> None:
    """Publish a copy of ``source`` as ``version`` the way training does (staging dir + rename)."""
    from ray_app import model_store

    with model_store.staging_dir(store) as staged:
        shutil.copytree(source, staged, dirs_exist_ok=True)
        model_store.publish(staged, store, version)


def publish_broken(store: Path, version: int) -> None:
    """Publish a version whose SavedModel cannot load (a graph file that is not a graph)."""
    from ray_app import model_store

    with model_store.staging_dir(store) as staged:
        (staged / "saved_model.pb").write_bytes(b"not a SavedModel")
        model_store.publish(staged, store, version)


def prepare_store(args: argparse.Namespace, workdir: Path) -> Path:
    """Our own store ``<workdir>/store/mnist`` holding version 1 (the user's store is never changed)."""
    from ray_app import model_store

    store = workdir / "store" / MODEL_NAME
    if args.model_base_path is not None:
        source_store = args.model_base_path / args.model_name
        latest = model_store.latest_version(source_store)
        if latest is None:
            raise SystemExit(f"no published version in {source_store}")
        source = model_store.version_path(source_store, latest)
        print(f"model: {source} (copied as version 1)", flush=True)
    else:
        source = workdir / "quick-model"
        print("model: training a quick one (tests.conftest.train_quick_model, one short epoch)", flush=True)
        code = f"from pathlib import Path; from tests.conftest import train_quick_model; train_quick_model(Path({str(source)!r}))"
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=600)
    publish_dir(source, store, 1)
    return store


@dataclass
class Cluster:
    """The local Ray this script started, and where to reach its pieces."""

    temp_dir: Path
    state_dir: str
    dashboard_url: str
    gcs_address: str
    metrics_export_port: int
    grpc_port: int
    http_port: int
    sd_file: Path
    processes: list[psutil.Process] = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def _ray_environment(store: Path, state_dir: str) -> dict[str, str]:
    """Everything Ray's processes must inherit: the front door and our model store. Ray's metrics
    report interval stays at its default: gauges age out of Ray's endpoint two intervals after they
    were last set, so a shorter interval would hide what users would see (ray_app/metrics.py)."""
    # Ray's fixed HAProxy-mode ports: free ones (other Serve instances run here)
    env = with_free_side_ports(front_door_env(node_cpus(), state_dir=state_dir))
    env.update(
        RAY_AUTH_MODE="disabled",  # a throwaway local cluster (RAY_FACTS: Operations)
        # The dashboard's and the autoscaler's own metrics servers default to fixed ports (44227,
        # 44217) and are listed in the service-discovery file even when another local Ray holds
        # them: free ones, so Prometheus scrapes this cluster only.
        DASHBOARD_METRIC_PORT=str(free_port()),
        AUTOSCALER_METRIC_PORT=str(free_port()),
        MODEL_NAME=MODEL_NAME,
        MODEL_BASE_PATH=str(store.parent),
    )
    return env


def serve_config(cluster: Cluster, store: Path, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """serve_configs/local.yaml on this cluster's ports and store; ``live`` updates its user_config."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = cluster.http_port
    config["grpc_options"]["port"] = cluster.grpc_port
    (app,) = config["applications"]
    app["args"].update(model_name=MODEL_NAME, model_base_path=str(store))
    (deployment,) = app["deployments"]
    deployment["user_config"].update(live or {})
    return config


def deploy(cluster: Cluster, config: dict[str, Any]) -> None:
    """Deploy ``config`` through Serve's REST API (what ``serve deploy`` does)."""
    http_json(f"{cluster.dashboard_url}/api/serve/applications/", method="PUT", body=config)


@contextlib.contextmanager
def local_ray(store: Path, workdir: Path) -> Iterator[Cluster]:
    """``ray.init`` a local cluster with the front door environment and its metrics export port set;
    on exit Serve and Ray are shut down and every process they started is checked gone."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's socket paths have a limit
    state_dir = leftovers.new_state_dir()
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(_ray_environment(store, state_dir))
    metrics_export_port, dashboard_port = free_port(), free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,  # its reporter module writes the service-discovery file
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_export_port,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
    )
    session_dir = (temp_dir / "session_latest").resolve()
    cluster = Cluster(
        temp_dir=temp_dir,
        state_dir=state_dir,
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        gcs_address=ray.get_runtime_context().gcs_address,
        metrics_export_port=metrics_export_port,
        grpc_port=free_port(),
        http_port=free_port(),
        sd_file=session_dir / SD_FILE,
    )
    print(f"ray: session {session_dir}, metrics export port {metrics_export_port}", flush=True)
    try:
        yield cluster
    finally:
        ours = psutil.Process().children(recursive=True)  # Ray's head processes are our children
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        left = leftovers.wait_gone(lambda: alive(ours) + leftovers.haproxy_processes(state_dir), timeout_s=30)
        if left:
            print(f"still running after shutdown, stopping: {leftovers.describe(left)}", flush=True)
            leftovers.stop(left)
        cluster.processes = alive(ours) + leftovers.haproxy_processes(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"ray: stopped; left running: {leftovers.describe(cluster.processes) or 'nothing'}", flush=True)


def wait_ready(cluster: Cluster, deadline_s: float) -> float:
    """Seconds until a Predict for version 1 succeeds through the front door."""
    from training.data import load_mnist

    images = load_mnist().test.images[:1]
    request = predict_request(images, version=1)
    started = time.monotonic()
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        predict = channel.unary_unary(PREDICT, request_serializer=serialize, response_deserializer=raw)
        while time.monotonic() - started < deadline_s:
            try:
                predict(request, timeout=RPC_TIMEOUT_S)
                return time.monotonic() - started
            except grpc.RpcError:
                time.sleep(1.0)
    raise TimeoutError(f"no Predict succeeded on {cluster.grpc_address} within {deadline_s:.0f} s")
