"""Median table over several ``bench.run_all --out`` files (one run each, same settings).

.venv/bin/python -m bench.summarize bench/results/run1.json bench/results/run2.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.run_all import fmt
from bench.variants import BASELINE


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for record in report["results"]:
        rows += [(record["variant"], p) for p in record["points"]]
        # "proxy_points": files of 2026-11-25 (ray-throughput-opt, the load also sent to the proxy)
        rows += [(f"{record['variant']} (via proxy)", p) for p in record.get("proxy_points", [])]
    return rows


def median_table(reports: list[dict[str, Any]]) -> str:
    """variant | c | images/request | median img/s (runs) | median p50 | median p99 | errors | vs baseline."""
    points: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        for name, p in _rows(report):
            points[(name, p["concurrency"], p["images_per_request"])].append(p)

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    img = {key: median([p["img_per_s"] for p in ps]) for key, ps in points.items()}
    lines = [
        "| variant | c | images/request | img/s (median) | runs | p50 ms | p99 ms | errors | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, ps in points.items():
        name, c, k = key
        base = img.get((BASELINE, c, k))
        ratio = f"{img[key] / base:.2f}" if base and name != BASELINE else "-"
        runs = " / ".join(f"{p['img_per_s']:.0f}" for p in ps)
        p50, p99 = median([p["p50_ms"] for p in ps]), median([p["p99_ms"] for p in ps])
        errors = sum(p["error_count"] for p in ps)
        lines.append(
            f"| {name} | {c} | {k} | {img[key]:.0f} | {runs} | {fmt(p50)} | {fmt(p99)} | {errors} | {ratio} |"
        )
    return "\n".join(lines)


def _process_group(component: str) -> str:
    """Which column a process's CPU goes to: replica, HAProxy, Python proxy, client, or Ray."""
    if component.startswith("ray::ServeReplica"):
        return "replica"
    if component == "haproxy":
        return "haproxy"
    if component in ("ray::ProxyActor", "ray::HAProxyManager"):
        return "proxy"
    if component.startswith("client"):
        return "client"
    if component == "bench.baseline_server":
        return "server"
    return "ray"  # raylet, GCS, dashboard, controller, the `serve run` driver (python3), ...


def cpu_ms_per_request(point: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per answered request by process group (cores / requests per second)."""
    if not point.get("req_per_s"):
        return {}
    groups: dict[str, float] = defaultdict(float)
    for component, cores in point.get("cpu_cores", {}).items():
        groups[_process_group(component)] += cores
    return {group: 1000.0 * cores / point["req_per_s"] for group, cores in groups.items()}


def detail_table(report: dict[str, Any]) -> str:
    """One ``run_all --repeat N`` file: median img/s (each run), ratio, latencies of the median run,
    the replica's mean batch and CPU per request by process group."""
    baseline = {
        (p["concurrency"], p["images_per_request"]): p.get("img_per_s_median", p["img_per_s"])
        for r in report["results"]
        if r["variant"] == BASELINE
        for p in r["points"]
    }
    lines = [
        "| variant | c | images/request | img/s (median) | runs | vs baseline | p50 ms | p99 ms | "
        "mean batch | CPU ms per request (by process) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in report["results"]:
        for p in record.get("points", []):
            img = p.get("img_per_s_median", p["img_per_s"])
            base = baseline.get((p["concurrency"], p["images_per_request"]))
            ratio = f"{img / base:.2f}" if base and record["variant"] != BASELINE else "-"
            runs = " / ".join(f"{v:.0f}" for v in p.get("img_per_s_runs", [p["img_per_s"]]))
            cpu = cpu_ms_per_request(p)
            cpu_text = ", ".join(
                f"{group} {ms:.2f}" for group, ms in sorted(cpu.items(), key=lambda kv: -kv[1])
            )
            batch = p.get("serve_mean_batch_images")
            lines.append(
                f"| {record['variant']} | {p['concurrency']} | {p['images_per_request']} | {img:.0f} | {runs} | "
                f"{ratio} | {fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {'-' if batch is None else batch} | {cpu_text} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print the median table of the given result files (``--detail``: one file's full table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument(
        "--detail",
        action="store_true",
        help="per file: medians of its --repeat runs, mean batch and CPU per request by process",
    )
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in args.results]
    if args.detail:
        table = "\n\n".join(detail_table(report) for report in reports)
        print(table)
        return table
    table = median_table(reports)
    print(table)
    return table


if __name__ == "__main__":
    main()
