"""Check the Grafana dashboard against real metrics: every panel's queries, evaluated by Prometheus.

Grafana cannot be installed here, Prometheus can (``apt-get install prometheus``). So this script
does what Grafana would do with ``serve_configs/grafana/mnist-serving.json``, minus the drawing:

1. a model store with version 1 (a copy of ``--model-base-path/--model-name``'s latest version,
   or a quick model trained in a subprocess with ``tests.conftest.train_quick_model``);
2. a local Ray (``ray.init``) with the app's front door environment (``ray_app.front_door``), its
   metrics export port set, the dashboard on a free port; ``serve_configs/local.yaml`` (free ports,
   our store) deployed through Serve's REST API, as ``serve deploy`` does;
3. ``prometheus`` on a free port, scraping every 5 s the targets Ray lists in
   ``<session dir>/prom_metrics_service_discovery.json`` (written by the dashboard's reporter
   module, ``ray/_private/metrics_agent.py: PrometheusServiceDiscoveryWriter``) via ``file_sd_configs``;
4. real gRPC and REST traffic for ``--traffic-s``: latest, pinned and labelled versions, unknown
   versions (NOT_FOUND), bad inputs (INVALID_ARGUMENT), too many images (RESOURCE_EXHAUSTED, a
   limit's refusal); meanwhile version 2 is published, labels ``stable: 1, canary: 2`` with a 25 %
   canary share are deployed live, and a broken version 3 is published (failed loads, retried);
5. a short real training run (``training/train.py --smoke-test --epochs 1``) on the same Ray, so
   the training panel has something to show (``--no-training`` skips it);
6. every target of every panel through Prometheus's HTTP API (``$application`` = ``mnist``, and
   ``.*`` as Grafana's "All"): an instant query (``/api/v1/query``) at the end of the phase that
   exercises the panel, and a range query over the whole run, summarised as Grafana's legend does
   (last non-null, max). A target with no series, or only NaN, fails the check (exit 1) unless it
   needs an event that this run skipped (say which in the report);
7. with matplotlib (the ``bench`` extra), the range queries plotted into one PNG.

Everything started here is stopped and checked gone (Ray's processes, HAProxy, Prometheus, the
training run); ``ray stop`` is never used (it would stop other people's Ray on this machine).

    .venv/bin/python -m bench.dashboard_check --out bench/results/dashboard.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import yaml

from ray_app import leftovers
from ray_app.front_door import HAPROXY_SWITCH, front_door_env, new_state_dir, node_cpus, with_free_side_ports
from ray_app.ports import free_port

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "serve_configs" / "grafana" / "mnist-serving.json"
SERVE_CONFIG = REPO / "serve_configs" / "local.yaml"
DEFAULT_PNG = REPO / "data" / "screenshots" / "dashboard-prometheus.png"
SD_FILE = (
    "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
)
MODEL_NAME = "mnist"
SCRAPE_INTERVAL_S = 5
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_S}s"  # what Grafana's $__rate_interval becomes at this scrape interval
RPC_TIMEOUT_S = 5.0  # deadline of every gRPC and REST call this script makes
HTTP_TIMEOUT_S = 10.0  # deadline of every call to Prometheus or Ray's dashboard
RAY_REPORT_INTERVAL_S = 10  # Ray's default RAY_metrics_report_interval_ms, kept: users run with it
SETTLE_S = RAY_REPORT_INTERVAL_S + 2 * SCRAPE_INTERVAL_S + 2  # replica flush + Ray's report + 2 scrapes
PLOT_TITLE = "the Grafana dashboard's queries, evaluated by Prometheus, plotted with matplotlib (not a Grafana screenshot)"
_PREDICT = "/tensorflow.serving.PredictionService/Predict"


# -- the dashboard ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    panel_id: int
    panel: str
    ref_id: str
    expr: str
    legend: str

    @property
    def training(self) -> bool:
        return "mnist_train_" in self.expr


def dashboard_targets(dashboard: dict[str, Any]) -> list[Target]:
    """Every target of every panel (rows' nested panels included), in dashboard order."""
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [
        Target(
            panel["id"],
            panel["title"],
            target.get("refId", "?"),
            target["expr"],
            target.get("legendFormat", ""),
        )
        for panel in panels
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def expand(expr: str, application: str) -> str:
    """The query Grafana would send: template variables replaced by values."""
    for name, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("${application}", application),
        ("$application", application),
    ):
        expr = expr.replace(name, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label value."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


# -- processes -------------------------------------------------------------------------------------
def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def _http_json(url: str, *, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
        text = reply.read().decode()
    return json.loads(text) if text.strip() else None


# -- the model store -------------------------------------------------------------------------------
def _publish_dir(source: Path, store: Path, version: int) -> None:
    """Publish a copy of ``source`` as ``version`` the way training does (staging dir + rename)."""
    from ray_app import model_store

    with model_store.staging_dir(store) as staged:
        shutil.copytree(source, staged, dirs_exist_ok=True)
        model_store.publish(staged, store, version)


def _publish_broken(store: Path, version: int) -> None:
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
    _publish_dir(source, store, 1)
    return store


# -- Ray and Serve -----------------------------------------------------------------------------------
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
    _http_json(f"{cluster.dashboard_url}/api/serve/applications/", method="PUT", body=config)


@contextlib.contextmanager
def local_ray(store: Path, workdir: Path) -> Iterator[Cluster]:
    """``ray.init`` a local cluster with the front door environment and its metrics export port set;
    on exit Serve and Ray are shut down and every process they started is checked gone."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's socket paths have a limit
    state_dir = new_state_dir()
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
        left = leftovers.wait_gone(
            lambda: _alive(ours) + leftovers.haproxy_processes(state_dir), timeout_s=30
        )
        if left:
            print(f"still running after shutdown, stopping: {leftovers.describe(left)}", flush=True)
            leftovers.stop(left)
        cluster.processes = _alive(ours) + leftovers.haproxy_processes(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"ray: stopped; left running: {leftovers.describe(cluster.processes) or 'nothing'}", flush=True)


def wait_ready(cluster: Cluster, deadline_s: float) -> float:
    """Seconds until a Predict for version 1 succeeds through the front door."""
    from training.data import load_mnist

    images = load_mnist().test.images[:1]
    request = _predict_request(images, version=1)
    started = time.monotonic()
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        predict = channel.unary_unary(_PREDICT, request_serializer=_serialize, response_deserializer=_raw)
        while time.monotonic() - started < deadline_s:
            try:
                predict(request, timeout=RPC_TIMEOUT_S)
                return time.monotonic() - started
            except grpc.RpcError:
                time.sleep(1.0)
    raise TimeoutError(f"no Predict succeeded on {cluster.grpc_address} within {deadline_s:.0f} s")


# -- traffic ---------------------------------------------------------------------------------------
def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _raw(data: bytes) -> bytes:
    return data


def _predict_request(images: np.ndarray, version: int | None = None, label: str | None = None) -> Any:
    from client.messages import ModelTarget, images_batch, predict_request

    return predict_request(ModelTarget(MODEL_NAME, version, label), images_batch(list(images)))


def _bad_shape_request(images: np.ndarray) -> Any:
    """A Predict whose ``images`` are 27x27: INVALID_ARGUMENT."""
    from ray_app.protocol.names import IMAGES_INPUT
    from ray_app.protocol.tensors import from_ndarray

    request = _predict_request(images[:1])
    request.inputs[IMAGES_INPUT].CopyFrom(from_ndarray(np.zeros((1, 27, 27), np.uint8), tensor_content=True))
    return request


@dataclass(frozen=True)
class Kind:
    """One kind of request the traffic sends, and the status it should get."""

    name: str
    protocol: str  # grpc | rest
    expected: str  # gRPC status code name
    needs_labels: bool = False


KINDS = {
    k.name: k
    for k in (
        Kind("grpc latest", "grpc", "OK"),
        Kind("grpc pinned v1", "grpc", "OK"),
        Kind("grpc label canary", "grpc", "OK", needs_labels=True),
        Kind("grpc unknown version 99", "grpc", "NOT_FOUND"),
        Kind("grpc 27x27 images", "grpc", "INVALID_ARGUMENT"),
        Kind("grpc 1025 images", "grpc", "RESOURCE_EXHAUSTED"),
        Kind("rest latest", "rest", "OK"),
        Kind("rest pinned v1", "rest", "OK"),
        Kind("rest unknown version 99", "rest", "NOT_FOUND"),
        Kind("rest ragged instances", "rest", "INVALID_ARGUMENT"),
    )
}
GRPC_CYCLE = (
    "grpc latest", "grpc pinned v1", "grpc latest", "grpc unknown version 99", "grpc latest",
    "grpc label canary", "grpc latest", "grpc 27x27 images", "grpc latest", "grpc pinned v1",
    "grpc latest", "grpc 1025 images",
)  # fmt: skip
REST_CYCLE = ("rest latest", "rest pinned v1", "rest latest", "rest ragged instances", "rest latest",
              "rest unknown version 99")  # fmt: skip
_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


class Traffic:
    """Paced gRPC and REST workers; ``labels`` set once the canary labels are deployed."""

    def __init__(self, cluster: Cluster, rate_rps: float, images_per_request: int) -> None:
        from training.data import load_mnist

        test = load_mnist().test.images
        self.cluster = cluster
        self.labels = threading.Event()
        self.stop = threading.Event()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._workers = 4  # 3 gRPC, 1 REST
        self._interval_s = self._workers / rate_rps
        k = images_per_request
        self._grpc = {
            "grpc latest": _predict_request(test[:k]),
            "grpc pinned v1": _predict_request(test[k : 2 * k], version=1),
            "grpc label canary": _predict_request(test[2 * k : 3 * k], label="canary"),
            "grpc unknown version 99": _predict_request(test[:k], version=99),
            "grpc 27x27 images": _bad_shape_request(test),
            "grpc 1025 images": _predict_request(test[:1025]),
        }
        instances = test[:k].tolist()
        self._rest = {
            "rest latest": (f"/v1/models/{MODEL_NAME}:predict", {"instances": instances}),
            "rest pinned v1": (f"/v1/models/{MODEL_NAME}/versions/1:predict", {"instances": instances}),
            "rest unknown version 99": (
                f"/v1/models/{MODEL_NAME}/versions/99:predict",
                {"instances": instances},
            ),
            "rest ragged instances": (f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2, 3], [4]]}),
        }

    def _record(self, kind: str, code: str) -> None:
        with self._lock:
            self.outcomes[(kind, code)] += 1

    def _pick(self, cycle: tuple[str, ...], i: int) -> str:
        kind = cycle[i % len(cycle)]
        return "grpc latest" if KINDS[kind].needs_labels and not self.labels.is_set() else kind

    def _paced(self, offset: int, cycle: tuple[str, ...], send: Callable[[str], str]) -> None:
        next_s = time.monotonic() + offset * self._interval_s / self._workers
        i = offset
        while not self.stop.is_set():
            time.sleep(max(0.0, next_s - time.monotonic()))
            next_s += self._interval_s
            kind = self._pick(cycle, i)
            i += 1
            self._record(kind, send(kind))

    def _grpc_worker(self, offset: int) -> None:
        options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
        with grpc.insecure_channel(self.cluster.grpc_address, options=options) as channel:
            predict = channel.unary_unary(_PREDICT, request_serializer=_serialize, response_deserializer=_raw)

            def send(kind: str) -> str:
                try:
                    predict(self._grpc[kind], timeout=RPC_TIMEOUT_S)
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

            self._paced(offset, GRPC_CYCLE, send)

    def _rest_worker(self, offset: int) -> None:
        def send(kind: str) -> str:
            path, body = self._rest[kind]
            request = urllib.request.Request(
                self.cluster.http_url + path, data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:  # urllib's timeout bounds each socket operation: enough for a local server
                with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as reply:
                    reply.read()
                return "OK"
            except urllib.error.HTTPError as exc:
                return _HTTP_TO_CODE.get(exc.code, f"HTTP {exc.code}")
            except OSError as exc:
                return f"no answer ({type(exc).__name__})"

        self._paced(offset, REST_CYCLE, send)

    def run(
        self, duration_s: float, events: list[tuple[float, str, Callable[[], None]]]
    ) -> list[dict[str, Any]]:
        """Send traffic for ``duration_s``; run each event ``(at_s, name, action)`` on time. Returns
        the events with their wall-clock times."""
        threads = [threading.Thread(target=self._grpc_worker, args=(i,), daemon=True) for i in range(3)]
        threads.append(threading.Thread(target=self._rest_worker, args=(3,), daemon=True))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        done = []
        try:
            for at_s, name, action in sorted(events, key=lambda e: e[0]):
                time.sleep(max(0.0, started + at_s - time.monotonic()))
                print(f"  t={time.monotonic() - started:5.1f}s  {name}", flush=True)
                done.append({"name": name, "time": time.time()})
                action()
            time.sleep(max(0.0, started + duration_s - time.monotonic()))
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=RPC_TIMEOUT_S + 5)
        return done


# -- training --------------------------------------------------------------------------------------
def run_training(cluster: Cluster, workdir: Path, timeout_s: float) -> tuple[bool, str]:
    """``training/train.py --smoke-test --epochs 1`` on our Ray (its own throwaway store)."""
    log = workdir / "training.log"
    cmd = [
        sys.executable, str(REPO / "training" / "train.py"), "--smoke-test", "--epochs", "1",
        "--model_path", str(workdir / "train-store" / MODEL_NAME),
        "--storage-path", str(workdir / "train-runs"), "--max-failures", "0",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs_address}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_process(proc)
        return False, f"stopped after {timeout_s:.0f} s (log {log})"
    finally:
        _stop_process(proc)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return proc.returncode == 0, f"exit {proc.returncode}: {tail[0][:200]}"


# -- Prometheus ------------------------------------------------------------------------------------
def prometheus_config(sd_file: Path) -> str:
    """Scrape what Ray's service-discovery file lists, every SCRAPE_INTERVAL_S."""
    return yaml.safe_dump(
        {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": "ray",
                    "file_sd_configs": [
                        {"files": [str(sd_file)], "refresh_interval": f"{SCRAPE_INTERVAL_S}s"}
                    ],
                }
            ],
        },
        sort_keys=False,
    )


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at_s: float) -> list[dict[str, Any]]:
        """``/api/v1/query`` at ``at_s`` (unix seconds): the result vector."""
        params = urllib.parse.urlencode({"query": expr, "time": f"{at_s:.3f}"})
        return self._data(f"{self.url}/api/v1/query?{params}")["result"]

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range``: one matrix entry per series."""
        params = urllib.parse.urlencode(
            {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"}
        )
        return self._data(f"{self.url}/api/v1/query_range?{params}")["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        """Grafana's ``label_values(metric, label)``."""
        params = urllib.parse.urlencode({"match[]": metric})
        return self._data(f"{self.url}/api/v1/label/{label}/values?{params}")

    def _data(self, url: str) -> Any:
        try:
            reply = _http_json(url)
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            raise RuntimeError(f"{exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus: {reply}")
        return reply["data"]


@contextlib.contextmanager
def prometheus(sd_file: Path, workdir: Path) -> Iterator[Prometheus]:
    """The ``prometheus`` binary on a free port with its own storage; stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(sd_file))
    port = free_port()
    log = workdir / "prometheus.log"
    cmd = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=HTTP_TIMEOUT_S) as reply:
                    if reply.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        print(f"prometheus: {server.url} (pid {proc.pid}), scraping what {sd_file.name} lists", flush=True)
        yield server
    finally:
        _stop_process(proc)
        print(f"prometheus: stopped (exit {proc.returncode})", flush=True)


def wait_scraped(server: Prometheus, cluster: Cluster, deadline_s: float) -> list[str]:
    """Wait until Prometheus scrapes our metrics export port; returns the ``up`` targets."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        up = server.query('up{job="ray"}', time.time())
        targets = [f"{r['metric'].get('instance')}={r['value'][1]}" for r in up]
        if any(t.endswith(f":{cluster.metrics_export_port}=1") for t in targets):
            return targets
        time.sleep(1.0)
    sd = cluster.sd_file.read_text() if cluster.sd_file.exists() else "(no file)"
    raise TimeoutError(f"Prometheus never scraped :{cluster.metrics_export_port}; {cluster.sd_file}: {sd}")


# -- evaluating the dashboard ------------------------------------------------------------------------
@dataclass
class Evaluation:
    target: Target
    query: str
    at_s: float  # instant query time
    instant: list[dict[str, Any]]
    instant_all: int  # series with $application = .* (Grafana's "All")
    series: list[dict[str, Any]]  # range query over the run
    error: str | None = None
    excused: str | None = None  # why an empty result is expected in this run

    @property
    def points(self) -> int:
        return sum(1 for s in self.series for _, v in s["values"] if _finite(v))

    @property
    def status(self) -> str:
        if self.error:
            return "query error"
        if not self.series:
            return "no series"
        if not self.points:
            return "NaN only"
        return "ok"


def _finite(value: str) -> bool:
    return math.isfinite(float(value))


def evaluate(
    server: Prometheus,
    targets: list[Target],
    window: tuple[float, float],
    phase_end: Callable[[Target], float],
) -> list[Evaluation]:
    """Every target: instant at its phase's end (``mnist`` and All), range over ``window``."""
    results = []
    for target in targets:
        query, at_s = expand(target.expr, MODEL_NAME), phase_end(target)
        try:
            instant = server.query(query, at_s)
            instant_all = len(server.query(expand(target.expr, ".*"), at_s))
            series = server.query_range(query, *window, SCRAPE_INTERVAL_S)
            results.append(Evaluation(target, query, at_s, instant, instant_all, series))
        except RuntimeError as exc:
            results.append(Evaluation(target, query, at_s, [], 0, [], error=str(exc)))
    return results


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _series_summary(evaluation: Evaluation, limit: int = 6) -> str:
    """Per series: its legend and labels, the instant value, and Grafana's legend figures over the
    run (last non-null, max)."""
    at_end = {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in evaluation.instant}
    parts = []
    for series in evaluation.series[:limit]:
        values = [float(v) for _, v in series["values"] if _finite(v)]
        labels = series["metric"]
        raw = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) or "no labels"
        instant = at_end.get(tuple(sorted(labels.items())))
        shown = "at the end " + ("-" if instant is None else _fmt(instant))
        shown += f"; run: last {_fmt(values[-1])}, max {_fmt(max(values))}" if values else "; run: NaN only"
        parts.append(f"**{legend(evaluation.target.legend, labels)}** `{{{raw}}}`: {shown}")
    if len(evaluation.series) > limit:
        parts.append(f"... {len(evaluation.series) - limit} more")
    return "<br>".join(parts) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict[str, Any], evaluations: list[Evaluation]) -> str:
    """The results page."""
    lines = [
        "# The Grafana dashboard, checked against real metrics",
        "",
        f"`{DASHBOARD.relative_to(REPO)}`: every target of every panel, evaluated by Prometheus "
        f"{report['prometheus_version']} over the metrics of a real run of the app "
        f"(`python -m bench.dashboard_check`, {report['started']}). Grafana itself is not installed "
        "here: this is what its panels would be given.",
        "",
        "## The run",
        "",
        f"- Ray {report['ray_version']} local (`ray.init`, 2 CPUs), front door "
        f"`{report['front_door']}`, metrics export port {report['metrics_export_port']}; "
        f"`serve_configs/local.yaml` deployed through Serve's REST API (free ports; model store "
        f"with version 1: {report['model']}); ready after {report['ready_s']:.0f} s.",
        f"- Prometheus scraped every {SCRAPE_INTERVAL_S} s what Ray's `{SD_FILE}` lists "
        f"(`file_sd_configs`): {', '.join(report['scrape_targets'])}.",
        f"- Traffic: {report['traffic_s']:.0f} s at ~{report['rate_rps']:g} requests/s, 3 gRPC + 1 REST "
        f"workers, {report['images_per_request']} images per good request, a {RPC_TIMEOUT_S:g} s "
        "deadline on each. Events (seconds after the traffic started):",
    ]
    for event in report["events"]:
        lines.append(f"  - t={event['time'] - report['traffic_start']:.0f} s: {event['name']}")
    lines.append(f"- Training: {report['training']}.")
    lines.append(
        f"- `$application`: Grafana's variable query `label_values(ray_mnist_requests_total, application)` "
        f'gives {report["applications"]}; the table uses `mnist`, and checks `.*` ("All") too.'
    )
    lines += [
        "",
        "What the clients saw (request kind, status: count; every kind got the status it should: "
        f"{'yes' if not report['unexpected'] else 'no, see ' + ', '.join(report['unexpected'])}):",
        "",
        "| request | expected | got |",
        "|---|---|---|",
    ]
    by_kind: dict[str, list[str]] = {}
    for (kind, code), count in sorted(report["outcomes"].items()):
        by_kind.setdefault(kind, []).append(f"{code} {count}")
    for kind, got in by_kind.items():
        lines.append(f"| {kind} | {KINDS[kind].expected} | {', '.join(got)} |")
    ok = sum(e.status == "ok" for e in evaluations)
    lines += [
        "",
        "## Every query",
        "",
        f"{ok} of {len(evaluations)} targets returned data. At the end: `/api/v1/query` at the end of "
        f"the phase that exercises the panel ({SETTLE_S} s after the traffic stopped; for the training "
        "panel, when the training run returned), with `$application` = `mnist` and `.*`. Over the run: "
        "`/api/v1/query_range` from the start of the traffic to the end of the check, "
        f"step {SCRAPE_INTERVAL_S} s, each series as Grafana's legend shows it (last non-null, max), "
        "with its labels. A rate's last value over the run is 0: the training run came after the traffic.",
        "",
        "| panel | ref | query | status | series at the end (mnist / All) | each series: legend `{labels}`: value at the end; over the run: last, max |",
        "|---|---|---|---|---|---|",
    ]
    for e in evaluations:
        status = e.status if not e.excused or e.status == "ok" else f"{e.status} (not exercised: {e.excused})"
        if e.error:
            status += f": {e.error[:200]}"
        lines.append(
            f"| {e.target.panel_id}. {_cell(e.target.panel)} | {e.target.ref_id} | `{_cell(e.query)}` | "
            f"{_cell(status)} | {len(e.instant)} / {e.instant_all} | {_cell(_series_summary(e))} |"
        )
    if report.get("png"):
        lines += ["", f"Plot of the range queries: `{report['png']}` ({PLOT_TITLE})."]
    lines += ["", f"Left running afterwards: {report['left_running'] or 'nothing'}.", ""]
    return "\n".join(lines)


def plot(evaluations: list[Evaluation], report: dict[str, Any], path: Path) -> None:
    """One PNG: a subplot per panel, a line per series, the run's events as vertical lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install -e '.[bench]' (or --no-plot)") from exc
    panels: dict[int, list[Evaluation]] = {}
    for e in evaluations:
        panels.setdefault(e.target.panel_id, []).append(e)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.4 * rows), squeeze=False)
    zero = report["traffic_start"]
    for ax, (_, group) in zip(axes.flat, panels.items()):
        plotted = False
        for e in group:
            for series in e.series:
                points = [(float(t) - zero, float(v)) for t, v in series["values"]]
                ax.plot(
                    *zip(*points), label=f"{e.target.ref_id}: {legend(e.target.legend, series['metric'])}"
                )
                plotted = True
        for event in report["events"]:
            ax.axvline(event["time"] - zero, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{group[0].target.panel_id}. {group[0].target.panel}", fontsize=10)
        ax.set_xlabel("s after the traffic started", fontsize=8)
        ax.tick_params(labelsize=8)
        if plotted:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    events = "; ".join(f"{e['time'] - zero:.0f} s: {e['name']}" for e in report["events"])
    subtitle = textwrap.fill(f"{DASHBOARD.name}, {report['started']}. Dotted lines: {events}", 150)
    figure.suptitle(f"{PLOT_TITLE}\n{subtitle}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


# -- main ------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the results (markdown)")
    parser.add_argument(
        "--model-base-path", type=Path, default=None, help="a model store root (default: train a quick model)"
    )
    parser.add_argument("--model-name", default="mnist", help="the model's directory under --model-base-path")
    parser.add_argument("--traffic-s", type=float, default=60.0)
    parser.add_argument(
        "--rate-rps", type=float, default=40.0, help="requests per second, all workers together"
    )
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--no-training", action="store_true", help="skip the smoke training run")
    parser.add_argument("--training-timeout-s", type=float, default=300.0)
    parser.add_argument("--ready-timeout-s", type=float, default=240.0)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help="the plot (needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs, configs and Prometheus' data")
    return parser.parse_args(argv)


def _prometheus_version() -> str:
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=30)
    first_line = (out.stdout or out.stderr).split("\n")[0]
    return first_line.replace("prometheus, version ", "").split(" (")[0].strip()


def _exercise(
    cluster: Cluster, store: Path, args: argparse.Namespace
) -> tuple[Traffic, list[dict[str, Any]]]:
    """The traffic with its events: version 2 published, canary labels deployed, broken version 3."""
    traffic = Traffic(cluster, args.rate_rps, args.images_per_request)

    def labels() -> None:
        deploy(cluster, serve_config(cluster, store, {"version_labels": {"stable": 1, "canary": 2},
                                                      "canary_traffic_percent": 25}))  # fmt: skip
        time.sleep(3)  # user_config reaches the replicas in ~1.4 s (RAY_FACTS)
        traffic.labels.set()

    duration_s = args.traffic_s
    events = [
        (
            0.25 * duration_s,
            "version 2 published (a copy of version 1)",
            lambda: _publish_dir(store / "1", store, 2),
        ),
        (0.45 * duration_s, "labels stable: 1, canary: 2 and canary_traffic_percent 25 deployed", labels),
        (0.65 * duration_s, "broken version 3 published (cannot load)", lambda: _publish_broken(store, 3)),
    ]
    return traffic, traffic.run(duration_s, events)


def main(argv: list[str] | None = None) -> int:
    """Run the app, scrape it, evaluate the dashboard; 0 when every exercised panel has data."""
    args = _parse_args(argv)
    if shutil.which("prometheus") is None:
        print("SKIPPED: no `prometheus` on PATH (Debian: apt-get install prometheus)", flush=True)
        return 0
    import ray

    started = datetime.datetime.now().astimezone()
    workdir = Path(tempfile.mkdtemp(prefix="dashcheck-"))
    print(f"work dir (logs, configs): {workdir}", flush=True)
    dashboard = json.loads(DASHBOARD.read_text())
    targets = dashboard_targets(dashboard)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "ray_version": ray.__version__,
        "prometheus_version": _prometheus_version(),
        "traffic_s": args.traffic_s,
        "rate_rps": args.rate_rps,
        "images_per_request": args.images_per_request,
    }
    store = prepare_store(args, workdir)
    report["model"] = (
        str(args.model_base_path / args.model_name)
        if args.model_base_path
        else "a quick model trained for this run"
    )
    evaluations: list[Evaluation] = []
    try:
        with local_ray(store, workdir) as cluster:
            report["metrics_export_port"] = cluster.metrics_export_port
            report["front_door"] = (
                "HAProxy + direct ingress" if os.environ.get(HAPROXY_SWITCH) == "1" else "Python proxy"
            )
            deploy(cluster, serve_config(cluster, store))
            report["ready_s"] = wait_ready(cluster, args.ready_timeout_s)
            print(f"serve: ready after {report['ready_s']:.0f} s on {cluster.grpc_address}", flush=True)
            with prometheus(cluster.sd_file, workdir) as server:
                report["scrape_targets"] = wait_scraped(server, cluster, deadline_s=60)
                report["traffic_start"] = time.time()
                traffic, report["events"] = _exercise(cluster, store, args)
                time.sleep(SETTLE_S)
                traffic_end = time.time()
                report["outcomes"] = dict(traffic.outcomes)
                report["unexpected"] = sorted(
                    {kind for (kind, code) in traffic.outcomes if code != KINDS[kind].expected}
                )
                if args.no_training:
                    report["training"] = "skipped (--no-training)"
                    trained = False
                else:
                    print("training: training/train.py --smoke-test --epochs 1 on this Ray", flush=True)
                    trained, how = run_training(cluster, workdir, args.training_timeout_s)
                    report["training"] = f"`training/train.py --smoke-test --epochs 1` on this Ray: {how}"
                    report["events"].append({"name": "training run returned", "time": time.time()})
                    time.sleep(SETTLE_S)
                training_end = report["events"][-1]["time"] if trained else time.time()
                end = time.time()
                report["applications"] = server.label_values("application", "ray_mnist_requests_total")
                evaluations = evaluate(
                    server,
                    targets,
                    (report["traffic_start"], end),
                    lambda t: training_end if t.training else traffic_end,
                )
        report["left_running"] = leftovers.describe(cluster.processes)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for e in evaluations:
        if e.target.training and not trained:
            e.excused = "needs a training run, and this run had none that finished"
    if not args.no_plot:
        try:
            plot(evaluations, report, args.png)
            report["png"] = (
                str(args.png.resolve().relative_to(REPO))
                if args.png.resolve().is_relative_to(REPO)
                else str(args.png)
            )
            print(f"wrote {args.png}", flush=True)
        except ImportError as exc:
            print(f"no plot: {exc}", flush=True)
    page = markdown(report, evaluations)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}", flush=True)
    failed = [e for e in evaluations if e.status != "ok" and not e.excused]
    for e in evaluations:
        print(
            f"  {e.status:10} {e.target.panel_id}.{e.target.ref_id} {e.target.panel}: {len(e.series)} series",
            flush=True,
        )
    if failed or report["left_running"]:
        print(
            f"FAILED: {len(failed)} targets without data; left running: {report['left_running']}", flush=True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
