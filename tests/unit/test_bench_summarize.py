"""bench/summarize.py --detail: ratios to the baseline, mean batch and CPU per request by process."""

from __future__ import annotations

import pytest

from bench.summarize import cpu_ms_per_request, detail_table


def _point(img: float, runs: list[float], req: float, cores: dict[str, float], batch: float | None = None):
    point = {
        "concurrency": 32,
        "images_per_request": 1,
        "img_per_s": img,
        "img_per_s_median": img,
        "img_per_s_runs": runs,
        "req_per_s": req,
        "p50_ms": 10.0,
        "p99_ms": 20.0,
        "cpu_cores": cores,
    }
    if batch is not None:
        point["serve_mean_batch_images"] = batch
    return point


def test_cpu_per_request_groups_processes() -> None:
    point = _point(
        400, [400], 400, {"ray::ServeReplica:mnist:MnistServer": 0.8, "haproxy": 0.04, "raylet": 0.02}
    )
    ms = cpu_ms_per_request(point)
    assert ms["replica"] == pytest.approx(2.0) and ms["haproxy"] == pytest.approx(0.1)
    assert ms["ray"] == pytest.approx(0.05)


def test_detail_table_divides_by_the_baseline_median() -> None:
    report = {
        "results": [
            {
                "variant": "baseline-batched",
                "points": [_point(1000, [900, 1000, 1100], 1000, {"bench.baseline_server": 1.0})],
            },
            {
                "variant": "ray-haproxy",
                "points": [_point(500, [450, 500, 550], 500, {"haproxy": 0.05}, batch=2.5)],
            },
        ]
    }
    table = detail_table(report)
    assert (
        "| ray-haproxy | 32 | 1 | 500 | 450 / 500 / 550 | 0.50 | 10.0 | 20.0 | 2.5 | haproxy 0.10 |" in table
    )
    assert "| baseline-batched | 32 | 1 | 1000 | 900 / 1000 / 1100 | - |" in table
