"""The app's metrics (ray_app/metrics.py) and the Grafana dashboard built on them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray_app.metrics import AppMetrics

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
    training = (
        (REPO / "training" / "metrics.py").read_text() if (REPO / "training" / "metrics.py").exists() else ""
    )
    names |= {f"ray_{n}" for n in re.findall(r'"(mnist_train_\w+)"', training)}
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
