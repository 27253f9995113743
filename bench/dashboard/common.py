"""What every part of the dashboard check shares: its paths and deadlines, process and HTTP helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
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
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def http_json(url: str, *, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
        text = reply.read().decode()
    return json.loads(text) if text.strip() else None
