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
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import format_result, run_load
from bench.processes import cpu_snapshot
from bench.servers import baseline_server, batch_stats, serve_app
from bench.variants import (
    BASELINE,
    CONCURRENCIES,
    DEFAULT_VARIANTS,
    IMAGES_PER_REQUEST,
    VARIANTS,
    Running,
    Variant,
)

REPO = Path(__file__).resolve().parent.parent


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
        cpu_before, wall_before = cpu_snapshot(sid, edge_pids()), time.monotonic()
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
        cpu_after = cpu_snapshot(sid, edge_pids())
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
                result.update(batch_stats(batches_before, batches_after) or {})
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
def fmt(value: float | None, digits: int = 1) -> str:
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
                f"{fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {errors} | {ratio} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument(
        "--edge-buffer-bytes",
        type=int,
        default=None,
        help="the edge variants' max_buffered_request_bytes (default: the edge's own, 1 MiB)",
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
    args = parse_args(argv)
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
