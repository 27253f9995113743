"""Image files for the client: find them, read them, turn them into MNIST tensors.

Tensor mode preprocesses on the client with the server's own code (``ray_app.preprocessing``),
so a digit gets the same 28x28 input whichever side prepares it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from client.errors import ClientError, ExitCode, ImageFileError
from ray_app.image_decoding import decode_image
from ray_app.preprocessing import to_mnist
from ray_app.protocol.status import ServingError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def find_image_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[ImageFileError]]:
    """The image files named or inside the directories named, and one error per name that fails."""
    found: list[Path] = []
    problems: list[ImageFileError] = []
    for raw in paths:
        path = Path(raw)
        try:
            if path.is_dir():
                inside = sorted(
                    p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
                if not inside:
                    raise ImageFileError(
                        f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in directory {path}"
                    )
                found.extend(inside)
            elif path.exists():
                found.append(path)
            else:
                raise ImageFileError(f"image file not found: {path}")
        except ImageFileError as exc:
            problems.append(exc)
        except OSError as exc:  # unreadable directory, name too long, ...
            problems.append(ImageFileError(f"cannot read {path}: {exc.strerror or exc}"))
    return found, problems


def read_image_bytes(path: Path) -> bytes:
    """The file's bytes; ImageFileError if it cannot be read or is empty."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageFileError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise ImageFileError(f"image file is empty: {path}")
    return data


def check_decodable(path: Path, data: bytes) -> None:
    """ImageFileError unless ``data`` decodes as an image (what bytes mode checks before sending)."""
    try:
        decode_image(data)
    except ServingError as exc:
        raise ImageFileError(f"{path}: not an image: {exc.message}") from None


def to_mnist_tensor(path: Path, data: bytes) -> np.ndarray:
    """uint8 [28, 28], white digit on black; ImageFileError if not a usable digit image."""
    try:
        return to_mnist(decode_image(data))
    except ServingError as exc:
        raise ImageFileError(f"{path}: not a usable digit image: {exc.message}") from None


def load_labels(path: Path) -> dict[str, int]:
    """Expected digits by file name from a JSON object like ``{"0.png": 7, ...}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ClientError(
            f"cannot read labels file {path}: {exc.strerror or exc}", exit_code=ExitCode.USAGE
        ) from None
    except ValueError as exc:
        raise ClientError(f"labels file {path} is not JSON: {exc}", exit_code=ExitCode.USAGE) from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9 for v in raw.values()
    ):
        raise ClientError(f"labels file {path} must map file names to digits 0-9", exit_code=ExitCode.USAGE)
    return {str(k): int(v) for k, v in raw.items()}
