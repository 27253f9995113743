"""Per-image cost of ``ray_app.preprocessing`` (decode + to_mnist), by kind of image.

    .venv/bin/python -m bench.preprocess_cost [--baseline-rev main] [--repeats 5]

Kinds: an MNIST test digit (28 px PNG), a drawn digit (400 px PNG), a finger/marker digit on a
phone-sized canvas (1080x1920 PNG), synthesised photos (360-960 px JPEG, the robustness set's
``photo`` category) and a 2000x1500 photo (3 Mpx JPEG). Each image is preprocessed ``--repeats``
times; the figure is the median per image, in milliseconds, on one core. ``--baseline-rev``
measures the same images with ``ray_app/preprocessing.py`` as it was at that git revision.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.handwriting import Pen, digit_paths, render  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _drawn(size: tuple[int, int], pen: float, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    height = 0.7 * min(size)
    coverage = render(digit_paths(seed % 10, rng), Pen(pen), size, height, (size[0] / 2, size[1] / 2), rng)
    grey = ((1.0 - coverage) * 255).astype(np.uint8)
    return _encode(np.stack([grey] * 3, axis=-1), fmt)


def images_by_kind() -> dict[str, list[bytes]]:
    """The images measured, a few of each kind."""
    from training.data import load_mnist
    from training.robustness import make_sample

    mnist = load_mnist().test.images[:20]
    return {
        "mnist_28px_png": [_encode(d, "PNG") for d in mnist],
        "drawn_400px_png": [_drawn((400, 400), 0.06, s, "PNG") for s in range(10)],
        "marker_1080x1920_png": [_drawn((1080, 1920), 0.15, s, "PNG") for s in range(5)],
        "photo_360_960px_jpeg": [make_sample("photo", i).data for i in range(20)],
        "photo_2000x1500_jpeg": [_drawn((2000, 1500), 0.05, s, "JPEG") for s in range(3)],
    }


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"preprocessing_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(preprocess: Callable[[bytes], np.ndarray], images: list[bytes], repeats: int) -> float:
    """Median milliseconds per image over ``repeats`` passes (each image preprocessed once per pass)."""
    per_image = []
    for _ in range(repeats):
        for data in images:
            started = time.perf_counter()
            try:
                preprocess(data)
            except Exception:  # a baseline that rejects an image still spent the time
                pass
            per_image.append(time.perf_counter() - started)
    return 1000 * statistics.median(per_image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline-rev", default=None, help="also measure preprocessing.py at this git revision"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from ray_app import preprocessing

    versions = {"this": preprocessing}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_rev:
            source = subprocess.run(
                ["git", "show", f"{args.baseline_rev}:ray_app/preprocessing.py"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            path = Path(tmp) / "baseline.py"
            path.write_text(source)
            versions[args.baseline_rev] = _load_module(path)
        kinds = images_by_kind()
        print(f"{'kind':<24}" + "".join(f"{name:>14}" for name in versions) + "   (median ms per image)")
        for kind, images in kinds.items():
            row = [median_ms(module.preprocess_bytes, images, args.repeats) for module in versions.values()]
            print(f"{kind:<24}" + "".join(f"{ms:>14.1f}" for ms in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
