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

from bench.run_all import BASELINE


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for record in report["results"]:
        rows += [(record["variant"], p) for p in record["points"]]
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
            f"| {name} | {c} | {k} | {img[key]:.0f} | {runs} | "
            f"{'-' if p50 is None else f'{p50:.1f}'} | {'-' if p99 is None else f'{p99:.1f}'} | "
            f"{errors} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print the median table of the given result files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    table = median_table([json.loads(path.read_text()) for path in args.results])
    print(table)
    return table


if __name__ == "__main__":
    main()
