"""MNIST in its original IDX format: loading, validation and per-worker sharding.

The four standard files (``train-images-idx3-ubyte.gz`` ...) are read from a local
directory or from any directory URI that ``pyarrow.fs`` understands (``s3://``,
``gs://``, ``hdfs://``). Nothing is downloaded from the internet.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(ValueError):
    """The data set is missing, truncated or not in IDX format."""


@dataclass(frozen=True)
class Split:
    """One split of MNIST: uint8 images ``[N, 28, 28]`` and uint8 labels ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def shard(self, index: int, count: int) -> Split:
        """The ``index``-th of ``count`` interleaved shards."""
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} out of range for {count} shards")
        return Split(self.images[index::count], self.labels[index::count])

    def head(self, n: int) -> Split:
        """The first ``n`` examples."""
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    source: str


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse one (already decompressed) IDX buffer into an array, checking its header."""
    if len(raw) < 4:
        raise DatasetError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{name}: not an IDX file (magic bytes {raw[:4].hex()}, expected 0000 08..0e + ndim)"
        )
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DatasetError(f"{name}: truncated header ({len(raw)} bytes, need {header_bytes})")
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header_bytes
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise DatasetError(
            f"{name}: {what}: header says shape {shape} ({expected} bytes), body has {body} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape)


def _read_bytes(data_dir: str, filename: str) -> bytes:
    if "://" in data_dir:
        import pyarrow.fs  # only needed for remote stores

        fs, root = pyarrow.fs.FileSystem.from_uri(data_dir)
        path = f"{root.rstrip('/')}/{filename}"
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as exc:
            raise DatasetError(f"cannot read {data_dir.rstrip('/')}/{filename}: {exc}") from exc
    path = Path(data_dir) / filename
    try:
        return path.read_bytes()
    except OSError as exc:
        hint = ""
        if Path(data_dir) == DEFAULT_DATA_DIR and not DEFAULT_DATA_DIR.is_dir():
            # An installed package (not the checkout) has no data/: the files ship with the source.
            hint = (
                " (MNIST ships in the source checkout's data/mnist; pass --data-dir with the 4 IDX gz files)"
            )
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}{hint}") from exc


def load_idx_file(data_dir: str, filename: str) -> np.ndarray:
    """Read and parse one gzip-compressed IDX file from ``data_dir``."""
    compressed = _read_bytes(data_dir, filename)
    try:
        raw = gzip.decompress(compressed)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{filename}: not a complete gzip file ({exc})") from exc
    return parse_idx(raw, filename)


def _load_split(data_dir: str, images_name: str, labels_name: str) -> Split:
    images = load_idx_file(data_dir, images_name)
    labels = load_idx_file(data_dir, labels_name)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_name}: expected uint8 images [N,28,28], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{labels_name}: expected uint8 labels [N], got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{images_name} has {images.shape[0]} images but {labels_name} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{labels_name}: label {int(labels.max())} is not a digit")
    return Split(images, labels)


def load_mnist(data_dir: str | Path | None = None) -> Mnist:
    """Load both splits of MNIST from ``data_dir`` (default: the copy shipped in ``data/mnist``)."""
    source = str(data_dir) if data_dir is not None else str(DEFAULT_DATA_DIR)
    train = _load_split(source, TRAIN_IMAGES, TRAIN_LABELS)
    test = _load_split(source, TEST_IMAGES, TEST_LABELS)
    return Mnist(train=train, test=test, source=source)
