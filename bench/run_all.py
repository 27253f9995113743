"""Measure our Ray Serve gRPC front door against the hand-written baseline, point by point.

For every variant it starts the server as a subprocess (its own session, free ports), waits
until a Predict succeeds, drives it with ``bench.loadgen.run_load`` at concurrency 1, 8, 32
with 1 and 32 images per request, then shuts it down (SIGINT, then harder signals to its
process group) before the next variant starts: at most one Ray instance runs at a time.
Serve variants run ``serve run -a local`` on serve_configs/local.yaml behind the front door a
variant names (``ray_app.front_door``: HAProxy + direct ingress, or Serve's Python proxy), the
load going to the config's gRPC port as a user's would. Each point records CPU cores per
process (replica, HAProxy, proxy, client) and the replica's mean batch (from the app's metrics).
Prints a markdown table and writes every result as JSON to ``--out``.

    .venv/bin/python -m bench.run_all --out bench/results/run.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.loadgen import build_requests, format_result, run_load
from ray_app import leftovers
from ray_app.front_door import HAPROXY_SWITCH, front_door_env, new_state_dir, node_cpus, with_free_side_ports
from ray_app.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "serve_configs" / "local.yaml"
CONCURRENCIES = (1, 8, 32)
IMAGES_PER_REQUEST = (1, 32)
BASELINE = "baseline-batched"


@dataclass(frozen=True)
class Variant:
    """One server set-up to measure."""

    name: str
    kind: str  # "baseline" | "serve"
    description: str
    batching: bool = True  # baseline: in-process batcher on/off
    front_door: str = "haproxy"  # serve: "haproxy" (HAProxy + direct ingress) | "python-proxy"
    max_batch_size: int | None = None  # serve: None keeps the config's user_config value
    batch_wait_timeout_s: float | None = None  # serve: None keeps the config's
    num_replicas: int | None = None  # serve: None keeps the config's
    grpc_request_timeout: bool = True  # serve: False drops grpc_options.request_timeout_s
    edge: str | None = None  # serve: "plaintext" | "tls": the load goes through ray_app.edge in front
    tokens: bool = False  # serve: bearer tokens on the data path (args.auth), sent by every client call
    concurrencies: tuple[int, ...] = CONCURRENCIES
    images_per_request: tuple[int, ...] = IMAGES_PER_REQUEST
    protocol: str = "tf_serving"  # the clients': tf_serving (Predict) | oip (ModelInfer, docs/oip.md)


VARIANTS = {
    v.name: v
    for v in (
        Variant(BASELINE, "baseline", "hand-written grpc.aio + batcher (32 images / 2 ms), no Ray"),
        Variant("baseline-unbatched", "baseline", "hand-written grpc.aio, one model call per request", False),
        Variant(
            "ray-haproxy",
            "serve",
            "serve_configs/local.yaml as users get it: HAProxy + direct ingress, 2 replicas",
        ),
        Variant(
            "ray-haproxy-oip",
            "serve",
            "ray-haproxy, clients on the Open Inference Protocol (gRPC ModelInfer, raw tensors)",
            protocol="oip",
        ),
        Variant(
            "ray-python-proxy",
            "serve",
            "serve_configs/local.yaml through Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=0, the fallback)",
            front_door="python-proxy",
        ),
        Variant(
            "ray-haproxy-1replica",
            "serve",
            "ray-haproxy with one replica (one process, one GIL)",
            num_replicas=1,
        ),
        Variant(
            "ray-haproxy-wait0",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0: a batch takes what queued while the last one ran",
            batch_wait_timeout_s=0.0,
        ),
        Variant(
            "ray-haproxy-wait2ms",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0.002 (the config's value until 2026-11-30; now 0.01)",
            batch_wait_timeout_s=0.002,
        ),
        Variant(
            "ray-haproxy-wait20ms",
            "serve",
            "ray-haproxy with batch_wait_timeout_s 0.02 (config: 0.01)",
            batch_wait_timeout_s=0.02,
        ),
        Variant(
            "ray-haproxy-no-grpc-timeout",
            "serve",
            "ray-haproxy without grpc_options.request_timeout_s (no timeout task per request)",
            grpc_request_timeout=False,
        ),
        Variant(
            "ray-haproxy-edge",
            "serve",
            "ray-haproxy behind the edge (ray_app/edge: a second HAProxy on the client ports), plaintext",
            edge="plaintext",
        ),
        Variant(
            "ray-haproxy-edge-tls",
            "serve",
            "ray-haproxy behind the edge with TLS (gRPC over TLS 1.3, P-256 certificate)",
            edge="tls",
        ),
        Variant(
            "ray-haproxy-tokens",
            "serve",
            "ray-haproxy with bearer tokens on the data path (every call checked by the replica)",
            tokens=True,
        ),
        Variant(
            "ray-haproxy-1replica-tokens",
            "serve",
            "ray-haproxy-1replica with bearer tokens on the data path (for profile_replica.py)",
            num_replicas=1,
            tokens=True,
        ),
        Variant(
            "ray-haproxy-edge-tls-tokens",
            "serve",
            "ray-haproxy behind the edge with TLS, and bearer tokens on the data path",
            edge="tls",
            tokens=True,
        ),
        Variant(
            "ray-haproxy-unbatched",
            "serve",
            "ray-haproxy with max_batch_size 1 (no batching)",
            max_batch_size=1,
            concurrencies=(32,),
        ),
    )
}
DEFAULT_VARIANTS = (
    BASELINE,
    "baseline-unbatched",
    "ray-haproxy",
    "ray-haproxy-oip",
    "ray-python-proxy",
    "ray-haproxy-1replica",
)


@dataclass
class Running:
    """A started server: where to send load, plus what was learnt while starting it."""

    target: str
    notes: dict[str, Any] = field(default_factory=dict)
    sid: int | None = None  # the server's session, for CPU accounting
    batch_metrics: Callable[[], dict[str, float] | None] | None = None  # images and backend calls so far
    root_certificates: bytes | None = None  # TLS: the CA to trust (None: plaintext)
    token: str | None = None  # bearer token the app wants (None: tokens off)
    edge_pids: Callable[[], set[int]] | None = None  # the edge's HAProxy processes, for CPU accounting


# -- processes -----------------------------------------------------------------------------------
def _session_pids(sid: int) -> list[int]:
    """PIDs still alive in session ``sid`` (the processes a Popen(start_new_session=True) left)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        pid, session = (int(x) for x in line.split())
        if session == sid:
            pids.append(pid)
    return pids


# Runs first in the child: a shell's `cmd &` starts us with SIGINT ignored, and an ignored signal
# stays ignored across exec, so `serve run` would never see our SIGINT. Restore it, then exec.
_RESTORE_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _start_server(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (so it and its children can be stopped together)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _RESTORE_SIGINT, *cmd],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_session(proc: subprocess.Popen[bytes], grace_s: float) -> str:
    """Stop a server started with ``start_new_session=True``; say how it ended.

    SIGINT goes to the leader first (``serve run`` then shuts Serve and its local cluster down
    in order: a group-wide SIGINT would also hit the cluster's GCS and raylet underneath it),
    then to the whole process group, then SIGTERM and SIGKILL; whatever is left of the session
    afterwards is killed.
    """
    sid = proc.pid  # the child leads its own session and process group
    how = "exited by itself"
    for step, send, wait_s in (
        ("SIGINT to the server", lambda: os.kill(sid, signal.SIGINT), grace_s),
        ("SIGINT to the process group", lambda: os.killpg(sid, signal.SIGINT), 15.0),
        ("SIGTERM to the process group", lambda: os.killpg(sid, signal.SIGTERM), 15.0),
        ("SIGKILL to the process group", lambda: os.killpg(sid, signal.SIGKILL), 15.0),
    ):
        if proc.poll() is not None:
            break
        how = step
        with contextlib.suppress(ProcessLookupError):
            send()
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            print(f"  [pid {sid}] still running {wait_s:.0f}s after {step}", flush=True)
    deadline = time.monotonic() + 20
    while _session_pids(sid) and time.monotonic() < deadline:  # Ray's daemons exit after the driver
        time.sleep(0.5)
    for pid in _session_pids(sid):  # still there: they are ours (our session), so end them
        print(f"  [pid {sid}] killing leftover pid {pid}", flush=True)
        how += " (+ leftovers killed)"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return how


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def _component(pid: int) -> str:
    """Ray's process title (``ray::ProxyActor``, ``ray::ServeReplica:...``), else the module or name."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return comm


def replica_pids(sid: int) -> list[int]:
    """The Serve replica processes of the server's session ``sid``."""
    return [pid for pid in _session_pids(sid) if _component(pid).startswith("ray::ServeReplica")]


def _cpu_snapshot(sid: int | None, edge_pids: set[int] = frozenset()) -> dict[str, float]:
    """CPU seconds so far by component: the server's session, the edge's HAProxy (``edge_pids``)
    and this process (the client)."""
    totals: dict[str, float] = {"client (loadgen)": _cpu_s(os.getpid())}
    for pid in _session_pids(sid) if sid else []:
        name = _component(pid)
        totals[name] = totals.get(name, 0.0) + _cpu_s(pid)
    for pid in edge_pids:
        totals["edge haproxy"] = totals.get("edge haproxy", 0.0) + _cpu_s(pid)
    return totals


def _scrape(ray_tmp: Path) -> str | None:
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


def _app_batch_counts(ray_tmp: Path) -> dict[str, float] | None:
    """Images answered and backend calls made so far, from the app's own metrics (ray_app/metrics.py)."""
    text = _scrape(ray_tmp)
    if text is None:
        return None
    totals = {"images": 0.0, "calls": 0.0}
    for line in text.splitlines():
        if line.startswith("ray_mnist_images_total{"):
            totals["images"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_mnist_backend_latency_ms_count{"):
            totals["calls"] += float(line.rsplit(" ", 1)[1])
    return totals


def _batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Backend calls between two reads and their mean size in images (exact: counters, not buckets)."""
    calls = after["calls"] - before["calls"]
    if calls <= 0:
        return None
    return {
        "serve_batches": int(calls),
        "serve_mean_batch_images": round((after["images"] - before["images"]) / calls, 2),
    }


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _predict_ok(target: str, request: Any, timeout_s: float, token: str | None = None) -> bool:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError:
            return False
        return "classes" in response.outputs


def _wait_ready(
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
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{_log_tail(log)}")
        for target in candidates:
            if _predict_ok(target, request, timeout_s=2.0, token=token):
                return target
        time.sleep(1.0)
    raise TimeoutError(f"no Predict succeeded on {candidates} within {deadline_s:.0f}s:\n{_log_tail(log)}")


@contextlib.contextmanager
def baseline_server(variant: Variant, args: argparse.Namespace, workdir: Path) -> Iterator[Running]:
    """Start ``bench.baseline_server`` on a free port; stop it on exit."""
    port = free_port()
    log = workdir / f"{variant.name}.log"
    model_dir = Path(args.model_base_path) / args.model_name / str(args.model_version)
    cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(port), "--model-dir", str(model_dir)]
    if not variant.batching:
        cmd.append("--no-batching")
    proc = _start_server(cmd, log)
    started = time.monotonic()
    notes: dict[str, Any] = {}
    try:
        request = build_requests(args.model_name, 1, count=1)[0][0]
        target = _wait_ready(proc, [f"127.0.0.1:{port}"], request, args.ready_timeout_s, log)
        notes["ready_s"] = round(time.monotonic() - started, 1)
        yield Running(target, notes, proc.pid)
    finally:
        notes["stopped_by"] = _stop_session(proc, grace_s=15)
        notes["exit_code"] = proc.returncode
        print(f"  baseline log tail: {_log_tail(log, 1)}", flush=True)


def _write_serve_config(
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
    _write_serve_config(variant, config_path, http_port, grpc_port, token_file)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths have a limit
    state_dir = new_state_dir()
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
    proc = _start_server(cmd, log, env)
    started = time.monotonic()
    notes: dict[str, Any] = {
        "ray_tmpdir": str(ray_tmp),
        "front_door": variant.front_door,
        "http_port": http_port,
    }
    try:
        request = build_requests(args.model_name, 1, count=1)[0][0]
        target = _wait_ready(proc, [f"127.0.0.1:{grpc_port}"], request, args.ready_timeout_s, log, token)
        notes["ready_s"] = round(time.monotonic() - started, 1)
        notes["tokens"] = variant.tokens
        running = Running(target, notes, proc.pid, lambda: _app_batch_counts(ray_tmp), token=token)
        if variant.edge is None:
            yield running
        else:
            with _edge_in_front(variant.edge, grpc_port, http_port, workdir / f"{variant.name}-edge") as edge:
                running.target, running.root_certificates, running.edge_pids, notes["edge_http_port"] = edge
                notes["edge"] = variant.edge
                yield running
    finally:
        notes["stopped_by"] = _stop_session(proc, grace_s=60)
        notes["exit_code"] = proc.returncode
        left = leftovers.wait_gone(lambda: leftovers.haproxy_processes(state_dir), 20)
        if left:
            notes["stopped_by"] += f" (+ {len(left)} haproxy left, stopped)"
            leftovers.stop(left)
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"  serve run exited with {proc.returncode} ({notes['stopped_by']})", flush=True)
        if not args.keep_ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _self_signed(directory: Path) -> tuple[Path, Path]:
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
def _edge_in_front(
    mode: str, grpc_port: int, http_port: int, workdir: Path
) -> Iterator[tuple[str, bytes | None, Callable[[], set[int]], int]]:
    """ray_app.edge on free ports in front of Ray's HAProxy; yields its gRPC target, CA (TLS), a
    function giving its processes, and its HTTP port."""
    from ray_app.edge.config import EdgeConfig
    from ray_app.edge.supervisor import EdgeProcess

    tls = None
    if mode == "tls":
        cert, key = _self_signed(workdir / "tls")
        tls = {"server_cert": cert, "server_key": key}
    config = EdgeConfig(
        bind_host="127.0.0.1",
        grpc_port=free_port(),
        http_port=free_port(),
        upstream={"grpc_port": grpc_port, "http_port": http_port},
        tls=tls,
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


# -- measuring -------------------------------------------------------------------------------------
def _measure(
    target: str, args: argparse.Namespace, c: int, k: int, running: Running, protocol: str = "tf_serving"
) -> dict[str, Any]:
    """``args.repeat`` runs of one point; the one with the median img/s (its own latencies)."""
    runs = []
    sid, batch_metrics = running.sid, running.batch_metrics
    edge_pids = running.edge_pids or set
    for _ in range(args.repeat):
        batches_before = batch_metrics() if batch_metrics else None
        cpu_before, wall_before = _cpu_snapshot(sid, edge_pids()), time.monotonic()
        result = asyncio.run(
            run_load(
                target,
                args.model_name,
                c,
                args.duration_s,
                k,
                warmup_s=args.warmup_s,
                timeout_s=args.timeout_s,
                protocol=protocol,
                root_certificates=running.root_certificates,
                token=running.token,
            )
        )
        wall_s = time.monotonic() - wall_before
        cpu_after = _cpu_snapshot(sid, edge_pids())
        # CPU cores each component used over the run (warm-up included), busiest first
        cores = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) / wall_s for name in cpu_after}
        result["cpu_cores"] = {
            n: round(v, 2) for n, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.02
        }
        result["loadavg_1m"] = os.getloadavg()[0]
        if batch_metrics:
            time.sleep(2.5)  # let the replica flush and export its counts (every 1 s here)
            batches_after = batch_metrics()
            if batches_before is not None and batches_after:
                result.update(_batch_stats(batches_before, batches_after) or {})
        mean_batch = result.get("serve_mean_batch_images")
        batch_note = f"; {result['serve_batches']} batches, mean {mean_batch} images" if mean_batch else ""
        print(f"    {format_result(result)}; cores {result['cpu_cores']}{batch_note}", flush=True)
        runs.append(result)
    runs.sort(key=lambda r: r["img_per_s"])
    median = dict(runs[(len(runs) - 1) // 2])
    median["img_per_s_runs"] = [round(r["img_per_s"], 1) for r in runs]
    median["img_per_s_median"] = statistics.median(r["img_per_s"] for r in runs)
    return median


def _run_variant(variant: Variant, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"\n== {variant.name}: {variant.description}", flush=True)
    start = baseline_server if variant.kind == "baseline" else serve_app
    record: dict[str, Any] = {"variant": variant.name, "description": variant.description, "points": []}
    try:
        with start(variant, args, workdir) as running:
            print(f"  ready at {running.target}: {running.notes}", flush=True)
            record["notes"] = running.notes
            record["target"] = running.target
            for k in variant.images_per_request:
                for c in variant.concurrencies:
                    if args.concurrencies and c not in args.concurrencies:
                        continue
                    if args.images_per_request and k not in args.images_per_request:
                        continue
                    record["points"].append(_measure(running.target, args, c, k, running, variant.protocol))
    except Exception as exc:  # report and go on with the next variant
        print(f"  FAILED: {exc}", flush=True)
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


# -- reporting ------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """variant | c | images/request | img/s | p50 | p99 | errors | ratio to the baseline's img/s."""
    baseline = {
        (p["concurrency"], p["images_per_request"]): p["img_per_s"]
        for r in records
        if r["variant"] == BASELINE
        for p in r["points"]
    }
    lines = [
        "| variant | c | images/request | img/s | p50 ms | p99 ms | errors | vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        rows = [(record["variant"], p) for p in record["points"]]
        if record.get("error"):
            lines.append(f"| {record['variant']} | - | - | failed: {record['error'][:80]} | | | | |")
        for name, p in rows:
            base = baseline.get((p["concurrency"], p["images_per_request"]))
            ratio = f"{p['img_per_s'] / base:.2f}" if base and record["variant"] != BASELINE else "-"
            errors = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
            lines.append(
                f"| {name} | {p['concurrency']} | {p['images_per_request']} | {p['img_per_s']:.0f} | "
                f"{_fmt(p['p50_ms'])} | {_fmt(p['p99_ms'])} | {errors} | {ratio} |"
            )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the results (JSON)")
    parser.add_argument("--model-base-path", type=Path, default=REPO / "runs")
    parser.add_argument("--model-name", default="full1")
    parser.add_argument("--model-version", type=int, default=1, help="the version the baseline serves")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of every RPC")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per point (odd: the median run is reported)"
    )
    parser.add_argument(
        "--concurrencies",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=None,
        help=f"only these of the variants' concurrencies (default: all, {','.join(map(str, CONCURRENCIES))})",
    )
    parser.add_argument(
        "--images-per-request",
        type=lambda text: tuple(int(k) for k in text.split(",")),
        default=None,
        help=f"only these of the variants' images per request (default: all, {','.join(map(str, IMAGES_PER_REQUEST))})",
    )
    parser.add_argument("--ready-timeout-s", type=float, default=240.0)
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a new temp dir)")
    parser.add_argument("--keep-ray-tmp", action="store_true", help="keep each run's RAY_TMPDIR (Ray's logs)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.model_base_path = args.model_base_path.resolve()
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every selected variant, print the table, write ``--out``."""
    args = _parse_args(argv)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"server logs and configs in {log_dir}", flush=True)
    records = [_run_variant(VARIANTS[name], args, log_dir) for name in args.variants.split(",")]
    table = markdown_table(records)
    print("\n" + table)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "results": records,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return records


if __name__ == "__main__":
    main()
