"""Regenerate the sample digits ``data/0.png`` ... ``data/9.png`` and ``data/samples.json``.

``d.png`` shows the digit d: it is the first MNIST test image whose label is d, saved unchanged
as a 28x28 8-bit grayscale PNG (white digit on black); ``samples.json`` maps each file name to
that label, for clients' ``--labels``.

Run: ``python data/make_samples.py [--data-dir data/mnist] [--out-dir data]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import load_mnist

DIGITS = range(10)
LABELS_FILE = "samples.json"


def first_index_of_each_digit(labels: np.ndarray) -> dict[int, int]:
    """Digit -> index of its first occurrence in ``labels``; ValueError if a digit is missing."""
    found: dict[int, int] = {}
    for digit in DIGITS:
        (indices,) = np.nonzero(labels == digit)
        if not len(indices):
            raise ValueError(f"no test image has label {digit}")
        found[digit] = int(indices[0])
    return found


def write_samples(data_dir: Path | str | None, out_dir: Path) -> dict[str, int]:
    """Write ``d.png`` for every digit d plus ``samples.json``; return the labels by file name."""
    test = load_mnist(data_dir).test
    labels: dict[str, int] = {}
    for digit, index in first_index_of_each_digit(test.labels).items():
        name = f"{digit}.png"
        Image.fromarray(test.images[index]).save(out_dir / name, format="PNG")
        labels[name] = digit
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(here / "mnist"), help="directory with the MNIST IDX files")
    parser.add_argument("--out-dir", default=str(here), help="where to write d.png and samples.json")
    args = parser.parse_args(argv)
    labels = write_samples(args.data_dir, Path(args.out_dir))
    print(f"wrote {len(labels)} samples to {args.out_dir}: {labels}")


if __name__ == "__main__":
    main()
