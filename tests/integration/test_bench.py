"""The README's benchmark command, shortened: both kinds of server, every load point, no errors.

Runs ``python -m bench.run_all`` as a user does, against a small trained model, with 1-second
points at concurrency 1 and 32; the figures themselves are not checked (speed is measured by the benchmark, not by
tests), only that every point ran, answered correctly and was recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import publish_copy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_runner_measures_baseline_and_the_serve_app(tmp_path, trained_export):
    publish_copy(trained_export, tmp_path / "models" / "mnist", 1)
    out = tmp_path / "run.json"
    argv = [
        sys.executable, "-m", "bench.run_all", "--out", str(out),
        "--model-base-path", str(tmp_path / "models"), "--model-name", "mnist",
        "--variants", "baseline-batched,ray-haproxy", "--duration-s", "1", "--warmup-s", "0.5", "--concurrencies", "1,32",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["baseline-batched", "ray-haproxy"]
    for record in report["results"]:
        points = record.get("points")
        assert points, record  # a variant that failed to start has no points
        assert {(p["concurrency"], p["images_per_request"]) for p in points} == {
            (c, k) for c in (1, 32) for k in (1, 32)
        }
        for point in points:
            assert point["requests_ok"] > 0 and point["error_count"] == 0, point
            assert point["accuracy"] >= 0.9, point  # real answers, checked against the labels
    assert "| ray-haproxy | 32 | 1 |" in report["table"]
