"""Unit tests for ray_app.image_decoding: untrusted bytes decoded under byte and pixel limits, each
refusal with its status and a message that names the limit (no Ray, no TensorFlow)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_app.image_decoding import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    declared_pixels,
    decode_image,
    load_image_file,
)
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError
from training.data import load_mnist


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_mnist().test.images[:2]


def _encode(array: np.ndarray, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def _upscale(digit: np.ndarray, size_px: int) -> np.ndarray:
    return np.asarray(Image.fromarray(digit).resize((size_px, size_px), Image.Resampling.BICUBIC))


def test_load_image_file(tmp_path: Path, digits: np.ndarray) -> None:
    path = tmp_path / "digit.png"
    path.write_bytes(_encode(digits[1]))
    np.testing.assert_array_equal(np.asarray(load_image_file(path)), digits[1])
    with pytest.raises(ResourceExhaustedError):
        load_image_file(path, max_bytes=10)
    with pytest.raises(OSError):
        load_image_file(tmp_path / "missing.png")


def test_empty_bytes() -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        decode_image(b"")


def test_random_bytes() -> None:
    junk = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidArgumentError, match="cannot decode image") as info:
        decode_image(junk)
    assert "not a recognised image format (PNG, JPEG" in str(info.value)
    assert "object at 0x" not in str(info.value)  # no repr of an in-memory buffer


def test_truncated_png(digits: np.ndarray) -> None:
    data = _encode(_upscale(digits[0], 200))
    with pytest.raises(InvalidArgumentError, match="cannot decode image") as info:
        decode_image(data[: len(data) // 2])
    assert "truncated" in str(info.value)


def test_unsupported_format_is_refused(digits: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot decode image"):
        decode_image(_encode(digits[0], "PCX"))


def test_too_many_bytes(digits: np.ndarray) -> None:
    data = _encode(digits[0])
    with pytest.raises(ResourceExhaustedError, match=f"over the limit of {len(data) - 1} bytes"):
        decode_image(data, max_bytes=len(data) - 1)
    assert len(_encode(digits[0])) < DEFAULT_MAX_IMAGE_BYTES
    with pytest.raises(ResourceExhaustedError, match="bytes"):
        decode_image(b"\0" * (DEFAULT_MAX_IMAGE_BYTES + 1))


def test_too_many_pixels_decompression_bomb() -> None:
    bomb = _encode(np.zeros((3000, 3000), dtype=np.uint8))  # 9 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ResourceExhaustedError, match="3000x3000 = 9000000 pixels, over the limit of 1000000"):
        decode_image(bomb, max_pixels=1_000_000)
    with pytest.raises(ResourceExhaustedError, match=f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS}"):
        decode_image(bomb)


@pytest.mark.parametrize("side_px", [40, 100])  # warning zone (> limit) and error zone (> 2x limit)
def test_pillow_bomb_guard_is_caught_locally(monkeypatch: pytest.MonkeyPatch, side_px: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(np.zeros((side_px, side_px), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test runner may turn warnings into errors itself
        with pytest.raises(ResourceExhaustedError, match="too large"):
            decode_image(data, max_pixels=10**9)


def test_global_pillow_limit_untouched(digits: np.ndarray) -> None:
    before = Image.MAX_IMAGE_PIXELS
    decode_image(_encode(digits[0]))
    assert Image.MAX_IMAGE_PIXELS == before


def test_declared_pixels_reads_the_header_only() -> None:
    bomb = _encode(np.zeros((3000, 3000), dtype=np.uint8))  # 9 Mpx in a few kB
    assert declared_pixels(bomb) == 9_000_000  # over decode_image's default limit: not decoded here
    with pytest.raises(InvalidArgumentError, match="empty"):
        declared_pixels(b"")
    with pytest.raises(ResourceExhaustedError, match="over the limit of 10 bytes"):
        declared_pixels(bomb, max_bytes=10)
