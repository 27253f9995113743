"""Regenerate the sample digits ``data/0.png`` ... ``data/9.png`` and ``data/samples.json``.

``N.png`` is the MNIST test image at index N, saved unchanged as a 28x28 8-bit grayscale PNG
(white digit on black); ``samples.json`` maps each file name to its true label from the data set.

Run: ``python data/make_samples.py [--data-dir data/mnist] [--out-dir data]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from training.data import load_mnist

SAMPLE_COUNT = 10
LABELS_FILE = "samples.json"


def write_samples(data_dir: Path | str | None, out_dir: Path, count: int = SAMPLE_COUNT) -> dict[str, int]:
    """Write the first ``count`` MNIST test images as PNGs plus their labels; return the labels."""
    test = load_mnist(data_dir).test
    labels: dict[str, int] = {}
    for index in range(count):
        name = f"{index}.png"
        Image.fromarray(test.images[index]).save(out_dir / name, format="PNG")
        labels[name] = int(test.labels[index])
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(here / "mnist"), help="directory with the MNIST IDX files")
    parser.add_argument("--out-dir", default=str(here), help="where to write N.png and samples.json")
    args = parser.parse_args(argv)
    labels = write_samples(args.data_dir, Path(args.out_dir))
    print(f"wrote {len(labels)} samples to {args.out_dir}: {labels}")


if __name__ == "__main__":
    main()
