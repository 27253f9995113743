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
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.dashboard.cluster import (
    Cluster,
    deploy,
    local_ray,
    prepare_store,
    publish_broken,
    publish_dir,
    serve_config,
    wait_ready,
)
from bench.dashboard.common import DASHBOARD, DEFAULT_PNG, REPO, SETTLE_S
from bench.dashboard.prometheus import prometheus, wait_scraped
from bench.dashboard.queries import dashboard_targets
from bench.dashboard.report import Evaluation, evaluate, markdown, plot
from bench.dashboard.traffic import KINDS, Traffic, run_training
from client.local import leftovers
from ray_app.front_door import HAPROXY_SWITCH


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
            lambda: publish_dir(store / "1", store, 2),
        ),
        (0.45 * duration_s, "labels stable: 1, canary: 2 and canary_traffic_percent 25 deployed", labels),
        (0.65 * duration_s, "broken version 3 published (cannot load)", lambda: publish_broken(store, 3)),
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
