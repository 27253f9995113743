"""What one model call costs by the images it carries: time per 1,024 images and RSS growth, for
the slice sizes ``max_execution_batch_size`` may take (docs/limits.md). In-process, through
``ray_app.backends.embedded.run_signature`` as a replica runs it; each memory figure comes from a
fresh process (TensorFlow's allocator keeps what it took).

    .venv/bin/python -m bench.execution_slices --model /tmp/benchstore/mnist/1 [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

IMAGES = 1024
SLICES = (1024, 256, 128, 64, 32)


def _images() -> np.ndarray:
    return np.full((IMAGES, 28, 28), 255, np.uint8)


def time_ms(loaded: Any, slice_images: int, runs: int = 5) -> float:
    """Median milliseconds for ``loaded`` (a ``LoadedVersion``) to answer ``IMAGES`` images in
    slices of ``slice_images``."""
    from ray_app.backends.embedded import run_signature

    images = _images()
    run_signature(loaded, "serving_default", {"images": images}, (), slice_images)  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run_signature(loaded, "serving_default", {"images": images}, (), slice_images)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def growth_mib(model: Path, slice_images: int, parallel: int) -> float:
    """RSS growth of this process while ``parallel`` requests of ``IMAGES`` images run at once."""
    from ray_app.backends.embedded import load_version, run_signature

    loaded, images = load_version(model, 1), _images()
    run_signature(loaded, "serving_default", {"images": images[:8]}, ())  # loaded and traced
    before = psutil.Process().memory_info().rss
    with ThreadPoolExecutor(parallel) as pool:
        calls = [
            pool.submit(run_signature, loaded, "serving_default", {"images": images}, (), slice_images)
            for _ in range(parallel)
        ]
        for call in calls:
            call.result()
    return (psutil.Process().memory_info().rss - before) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a version directory (SavedModel)")
    parser.add_argument("--parallel", type=int, default=4, help="requests at once for the memory figure")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    parser.add_argument("--growth-of", type=int, default=None, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.growth_of is not None:
        print(json.dumps(growth_mib(args.model, args.growth_of, args.parallel)))
        return {}
    from ray_app.backends.embedded import load_version

    loaded, results = load_version(args.model, 1), {}  # once for the timings; memory: each child its own
    for slice_images in SLICES:
        child = subprocess.run(
            [sys.executable, "-m", "bench.execution_slices", "--model", str(args.model),
             "--parallel", str(args.parallel), "--growth-of", str(slice_images)],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        grown = json.loads(child.stdout.strip().splitlines()[-1])
        results[slice_images] = {"ms_per_1024_images": round(time_ms(loaded, slice_images), 1),
                                 f"rss_growth_mib_{args.parallel}_at_once": round(grown, 1)}  # fmt: skip
        print(f"slices of {slice_images}: {results[slice_images]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": str(args.model),
                                        "images": IMAGES, "slices": results}, indent=2) + "\n")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
