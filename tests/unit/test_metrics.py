"""The app's metrics (ray_app/metrics.py) and the Grafana dashboard built on them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray_app.metrics import AppMetrics
from training.metrics import EpochGauges

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "serve_configs" / "grafana" / "mnist-serving.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _defined_names() -> set[str]:
    """Names Prometheus shows for our metrics: Ray prefixes ``ray_``; histograms add suffixes."""
    metrics = AppMetrics("mnist")
    names = set()
    for metric in vars(metrics).values():
        name = getattr(metric, "_name", None)
        if name:
            kind = type(metric).__name__
            suffixes = HISTOGRAM_SUFFIXES if kind == "Histogram" else ("",)
            names |= {f"ray_{name}{suffix}" for suffix in suffixes}
    gauges = EpochGauges("run")  # the training run's gauges (training/metrics.py)
    try:
        names |= {f"ray_{gauge._name}" for gauge in gauges._gauges.values()}
    finally:
        gauges.close()
    return names


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = _defined_names()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bray_mnist_\w+", target["expr"]))
    assert used, "the dashboard queries nothing"
    assert used <= defined, sorted(used - defined)
    titles = {panel["title"] for panel in dashboard["panels"]}
    for needed in ("Requests/s by version", "Errors/s by code", "Versions loaded"):
        assert needed in titles
    assert any("histogram_quantile(0.99" in t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_versions_gauge_drops_versions_that_are_gone() -> None:
    metrics = AppMetrics("mnist")
    recorded: list[tuple[float, dict[str, str]]] = []
    metrics._versions.set = lambda value, tags: recorded.append((value, tags))  # see what reaches Ray
    metrics.versions({1: "AVAILABLE", 2: "LOADING"})
    metrics.versions({2: "AVAILABLE"})
    last = {(t["version"], t["state"]): v for v, t in recorded[2:]}
    assert last == {("2", "AVAILABLE"): 1.0, ("1", "AVAILABLE"): 0.0, ("2", "LOADING"): 0.0}


def test_version_load_panel_reads_cumulative_series() -> None:
    """A replica loads a version once: its load-time and failure series start with the event already
    counted, so rate()/increase() over them shows nothing (bench/dashboard_check.py saw NaN)."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if "mnist_version_load_" in target["expr"]:
                assert not re.search(r"\b(rate|increase|irate)\(", target["expr"]), target["expr"]


def test_health_check_sets_the_canary_gauge_again() -> None:
    """Ray drops a gauge ~2 report intervals after it was last set: each health check re-sets it."""
    from types import SimpleNamespace

    from ray_app.config import LiveConfig
    from ray_app.deployment import MnistServer
    from tests.unit.conftest import run_on_replica_loop

    metrics = AppMetrics("mnist")
    recorded: list[tuple[float, dict[str, str]]] = []
    metrics._canary_percent.set = lambda value, tags: recorded.append((value, tags))
    metrics._versions.set = lambda value, tags: None
    server = SimpleNamespace(  # the replica's state that check_health reads
        _metrics=metrics,
        _backend=SimpleNamespace(version_states=dict, health_problem=lambda: None),
        _predictor=SimpleNamespace(live=LiveConfig(version_labels={"canary": 2}, canary_traffic_percent=25)),
    )
    for _ in range(2):
        run_on_replica_loop(MnistServer.func_or_class.check_health(server))
    assert recorded == [(25.0, {"model": "mnist"})] * 2


def test_epoch_gauges_are_set_again_until_closed() -> None:
    import time

    from training.metrics import EpochGauges

    gauges = EpochGauges("run-1", refresh_s=0.01)
    recorded: list[tuple[str, float]] = []
    for key, gauge in gauges._gauges.items():
        gauge.set = lambda value, tags, key=key: recorded.append((key, value, tags["run"]))
    gauges.report({"loss": 0.5, "test_accuracy": 0.9, "epoch": 1, "other": 7})
    deadline = time.monotonic() + 5
    while len(recorded) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    gauges.close()
    assert set(recorded) == {("loss", 0.5, "run-1"), ("test_accuracy", 0.9, "run-1"), ("epoch", 1.0, "run-1")}
    assert len(recorded) >= 6  # set by report(), then again by the refresher
    time.sleep(0.05)
    settled = len(recorded)
    time.sleep(0.05)
    assert len(recorded) == settled  # closed: no more sets


def test_mean_batch_size_comes_from_counters() -> None:
    """Ray 2.60 rebuilds a histogram's _sum from bucket midpoints (batches of 8 images read as 6):
    the mean batch is images answered over backend calls."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert not any("ray_mnist_batch_size_images_sum" in e for e in exprs)
    assert any("ray_mnist_images_total" in e and "ray_mnist_batch_size_images_count" in e for e in exprs)
