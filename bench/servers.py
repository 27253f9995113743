"""Starting each kind of variant for a run: the baseline server, the Serve app (``serve run`` on
serve_configs/local.yaml behind its front door, optionally behind the TLS edge), readiness, and the
app's batch figures from its metrics."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.loadgen import build_requests
from bench.processes import start_server, stop_session
from bench.variants import Running, Variant
from client.local import leftovers
from client.local.ports import free_port, with_free_side_ports
from ray_app.front_door import HAPROXY_SWITCH, front_door_env, node_cpus

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "serve_configs" / "local.yaml"


def scrape(ray_tmp: Path) -> str | None:
    """The node's Prometheus text (Ray's metrics endpoint of the cluster in ``ray_tmp``)."""
    session = ray_tmp / "ray" / "session_latest"
    try:
        (port_file,) = session.glob("metrics_export_port_*")
        port = port_file.read_text().strip()
        targets = json.loads((session / "prom_metrics_service_discovery.json").read_text())[0]["targets"]
        target = next(t for t in targets if t.endswith(f":{port}"))
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as reply:
            return reply.read().decode()
    except (OSError, ValueError, StopIteration, IndexError, KeyError):
        return None


def app_batch_counts(ray_tmp: Path) -> dict[str, Any] | None:
    """Images answered and backend calls made so far, from the app's own metrics
    (ray_app/metrics.py), and the images of each replica (Serve tags every sample with it)."""
    text = scrape(ray_tmp)
    if text is None:
        return None
    totals: dict[str, Any] = {"images": 0.0, "calls": 0.0, "replica_images": {}}
    for line in text.splitlines():
        if line.startswith("ray_mnist_images_total{"):
            value = float(line.rsplit(" ", 1)[1])
            totals["images"] += value
            replica = re.search(r'replica="([^"]*)"', line)
            if replica:
                key = replica.group(1)
                totals["replica_images"][key] = totals["replica_images"].get(key, 0.0) + value
        elif line.startswith("ray_mnist_backend_latency_ms_count{"):
            totals["calls"] += float(line.rsplit(" ", 1)[1])
    return totals


def batch_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """Backend calls between two reads and their mean size in images (exact: counters, not
    buckets), and each replica's share of the images, largest first (how evenly the front door
    balanced)."""
    calls = after["calls"] - before["calls"]
    if calls <= 0:
        return None
    images = after["images"] - before["images"]
    per_replica = [
        count - before.get("replica_images", {}).get(replica, 0.0)
        for replica, count in after.get("replica_images", {}).items()
    ]
    stats: dict[str, Any] = {
        "serve_batches": int(calls),
        "serve_mean_batch_images": round(images / calls, 2),
    }
    if images > 0 and per_replica:
        stats["serve_replica_image_shares"] = sorted(
            (round(n / images, 3) for n in per_replica), reverse=True
        )
    return stats


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def predict_ok(target: str, request: Any, timeout_s: float, token: str | None = None) -> bool:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError:
            return False
        return "classes" in response.outputs


def wait_ready(
    proc: subprocess.Popen[bytes],
    candidates: list[str],
    request: Any,
    deadline_s: float,
    log: Path,
    token: str | None = None,
) -> str:
    """The first of ``candidates`` that answers a Predict, probing until ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{log_tail(log)}")
        for target in candidates:
            if predict_ok(target, request, timeout_s=2.0, token=token):
                return target
        time.sleep(1.0)
    raise TimeoutError(f"no Predict succeeded on {candidates} within {deadline_s:.0f}s:\n{log_tail(log)}")


@contextlib.contextmanager
def baseline_server(variant: Variant, args: argparse.Namespace, workdir: Path) -> Iterator[Running]:
    """Start ``bench.baseline_server`` on a free port; stop it on exit."""
    port = free_port()
    log = workdir / f"{variant.name}.log"
    model_dir = Path(args.model_base_path) / args.model_name / str(args.model_version)
    cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(port), "--model-dir", str(model_dir)]
    if not variant.batching:
        cmd.append("--no-batching")
    proc = start_server(cmd, log)
    started = time.monotonic()
    notes: dict[str, Any] = {}
    try:
        request = build_requests(args.model_name, 1, count=1)[0][0]
        target = wait_ready(proc, [f"127.0.0.1:{port}"], request, args.ready_timeout_s, log)
        notes["ready_s"] = round(time.monotonic() - started, 1)
        yield Running(target, notes, proc.pid)
    finally:
        notes["stopped_by"] = stop_session(proc, grace_s=15)
        notes["exit_code"] = proc.returncode
        print(f"  baseline log tail: {log_tail(log, 1)}", flush=True)


def write_serve_config(
    variant: Variant, path: Path, http_port: int, grpc_port: int, token_file: Path | None = None
) -> None:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    if not variant.grpc_request_timeout:
        config["grpc_options"].pop("request_timeout_s", None)
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    if variant.max_batch_size is not None:
        deployment["user_config"]["max_batch_size"] = variant.max_batch_size
    if variant.batch_wait_timeout_s is not None:
        deployment["user_config"]["batch_wait_timeout_s"] = variant.batch_wait_timeout_s
    if variant.num_replicas is not None:
        deployment["num_replicas"] = variant.num_replicas
    if token_file is not None:
        app["args"]["auth"] = {"token_file": str(token_file)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def serve_app(variant: Variant, args: argparse.Namespace, workdir: Path) -> Iterator[Running]:
    """``serve run -a local`` a copy of serve_configs/local.yaml behind the variant's front door, in a
    fresh RAY_TMPDIR; stop it on exit (and check its HAProxy is gone)."""
    http_port, grpc_port = free_port(), free_port()
    config_path = workdir / f"{variant.name}.yaml"
    token, token_file = None, None
    if variant.tokens:
        token, token_file = secrets.token_urlsafe(32), workdir / f"{variant.name}.tokens"
        token_file.write_text(f"{token}\n")
        token_file.chmod(0o600)
    write_serve_config(variant, config_path, http_port, grpc_port, token_file)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths have a limit
    state_dir = leftovers.new_state_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", HAPROXY_SWITCH)}
    door = {HAPROXY_SWITCH: "0"} if variant.front_door == "python-proxy" else {}
    env.update(front_door_env(node_cpus(), state_dir=state_dir, environ=door))
    with_free_side_ports(env)  # Ray's fixed HAProxy-mode ports: free ones (other Serve instances run here)
    env.update(
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",  # throwaway local cluster (RAY_FACTS: Operations)
        MODEL_NAME=args.model_name,
        MODEL_BASE_PATH=str(args.model_base_path),
        PYTHONUNBUFFERED="1",  # keep serve run's last lines in the log even if it must be killed
        RAY_metrics_report_interval_ms="1000",  # export metrics every second so each point can be read
    )
    log = workdir / f"{variant.name}.log"
    cmd = [str(Path(sys.executable).parent / "serve"), "run", "-a", "local", str(config_path)]
    proc = start_server(cmd, log, env)
    started = time.monotonic()
    notes: dict[str, Any] = {
        "ray_tmpdir": str(ray_tmp),
        "front_door": variant.front_door,
        "http_port": http_port,
    }
    try:
        request = build_requests(args.model_name, 1, count=1)[0][0]
        target = wait_ready(proc, [f"127.0.0.1:{grpc_port}"], request, args.ready_timeout_s, log, token)
        notes["ready_s"] = round(time.monotonic() - started, 1)
        notes["tokens"] = variant.tokens
        running = Running(target, notes, proc.pid, lambda: app_batch_counts(ray_tmp), token=token)
        if variant.edge is None:
            yield running
        else:
            edge_dir = workdir / f"{variant.name}-edge"
            # run_all's option; the other benches' arguments lack it: the edge's default
            buffer_bytes = getattr(args, "edge_buffer_bytes", None)
            with edge_in_front(variant.edge, grpc_port, http_port, edge_dir, buffer_bytes) as edge:
                running.target, running.root_certificates, running.edge_pids, notes["edge_http_port"] = edge
                notes["edge"] = variant.edge
                yield running
    finally:
        notes["stopped_by"] = stop_session(proc, grace_s=60)
        notes["exit_code"] = proc.returncode
        left = leftovers.wait_gone(lambda: leftovers.haproxy_processes(state_dir), 20)
        if left:
            notes["stopped_by"] += f" (+ {len(left)} haproxy left, stopped)"
            leftovers.stop(left)
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"  serve run exited with {proc.returncode} ({notes['stopped_by']})", flush=True)
        if not args.keep_ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway P-256 certificate for localhost (openssl), its own root."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def edge_in_front(
    mode: str, grpc_port: int, http_port: int, workdir: Path, buffer_bytes: int | None = None
) -> Iterator[tuple[str, bytes | None, Callable[[], set[int]], int]]:
    """ray_app.edge on free ports in front of Ray's HAProxy; yields its gRPC target, CA (TLS), a
    function giving its processes, and its HTTP port. ``buffer_bytes``: its
    ``max_buffered_request_bytes`` (None: the default)."""
    from ray_app.edge.config import EdgeConfig
    from ray_app.edge.supervisor import EdgeProcess

    tls = None
    if mode == "tls":
        cert, key = self_signed(workdir / "tls")
        tls = {"server_cert": cert, "server_key": key}
    config = EdgeConfig(
        bind_host="127.0.0.1",
        grpc_port=free_port(),
        http_port=free_port(),
        upstream={"grpc_port": grpc_port, "http_port": http_port},
        tls=tls,
        limits={} if buffer_bytes is None else {"max_buffered_request_bytes": buffer_bytes},
    )
    edge = EdgeProcess(config, workdir / "state")
    edge.start()
    try:
        host = "localhost" if tls else "127.0.0.1"  # the certificate's name
        ca = tls["server_cert"].read_bytes() if tls else None
        yield f"{host}:{config.grpc_port}", ca, lambda: {edge.pid, *edge.workers()}, config.http_port
    finally:
        left = edge.stop(grace_s=5)
        if left:
            print(f"  edge processes left after stop: {[p.pid for p in left]}", flush=True)
