"""MNIST-style preprocessing of an arbitrary digit image (numpy and Pillow only).

Shared by the server (decoding uploaded PNG/JPEG bytes) and the client (building tensors).
:func:`decode_image` turns untrusted bytes into a fully loaded ``PIL.Image``, enforcing a byte
limit and a pixel limit (the pixel count is read from the header, before any pixel data is
decompressed, so a tiny PNG that expands to gigabytes is refused cheaply).

:func:`to_mnist` then makes the image look like an MNIST digit, the way the data set itself was
made (LeCun et al.: size-normalised into a 20x20 box with anti-aliasing, then centred by centre
of mass in a 28x28 field):

1. Apply the EXIF orientation, flatten any alpha channel onto white, convert to grayscale from
   any mode (16-bit and float modes are scaled, not clipped).
2. Polarity: MNIST is a white digit on black. If the median of the outer ring of pixels (the
   background) is light (> 127), invert.
3. Suppress the background: subtract the background level (border median plus three robust
   standard deviations of the border, so a grey or noisy background becomes 0), clip at 0 and
   stretch so the strongest ink is 255.
4. Find the bounding box of the ink (pixels above 20% of the maximum). No ink at all means
   the image is blank: :class:`~ray_app.protocol.status.InvalidArgumentError`.
5. Scale so that box's longer side is 20 px, keeping the aspect ratio (Lanczos, which
   anti-aliases when downsampling); the crop keeps a 1 px (after scaling) fringe around the box
   so faint edges survive. Stretch again so the ink peaks at 255.
6. Place it in a 28x28 black canvas so that its intensity-weighted centre of mass lands on
   (14, 14), clipping the shift so the digit stays inside the canvas.

An image that already is an MNIST digit comes out unchanged.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError

DEFAULT_MAX_IMAGE_PIXELS: int = 4_000_000  # decompression-bomb guard (width * height)
DEFAULT_MAX_IMAGE_BYTES: int = 4 * 1024 * 1024

MNIST_SIZE_PX = 28
DIGIT_BOX_PX = 20

# Raster formats we decode. Anything else (EPS, which runs Ghostscript, and rarer plugins) is
# refused: less attack surface for bytes that come from the network.
_ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
_MIN_INK_LEVEL = 24.0  # below this contrast (of 255) after background removal, nothing is drawn
_BBOX_FRACTION = 0.2  # ink above this fraction of the maximum counts for the bounding box
_FRINGE_PX = 1  # faint ink kept around that box, in output pixels
_NOISE_SIGMAS = 3.0
_MAD_TO_SIGMA = 1.4826


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Image.Image:
    """Decode PNG/JPEG/... bytes into a fully loaded image, enforcing the byte and pixel limits.

    Raises InvalidArgumentError for empty, undecodable, truncated or zero-sized images and
    ResourceExhaustedError for images over ``max_bytes`` or ``max_pixels``.
    """
    if not data:
        raise InvalidArgumentError("image_bytes: empty (0 bytes)")
    if len(data) > max_bytes:
        raise ResourceExhaustedError(
            f"image_bytes: {len(data)} bytes, over the limit of {max_bytes} bytes", "max_image_bytes"
        )
    # Pillow's own bomb check warns (or raises) inside Image.open; turn the warning into an
    # error here only, leaving the global Image.MAX_IMAGE_PIXELS alone.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
            _check_size(image, max_pixels)
            image.load()
        except (InvalidArgumentError, ResourceExhaustedError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ResourceExhaustedError(
                f"image is too large to decode (over the limit of {max_pixels} pixels): {exc}",
                "max_image_pixels",
            ) from exc
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
            raise InvalidArgumentError(f"image_bytes: cannot decode image: {_describe(exc)}") from exc
    return image


def declared_pixels(data: bytes, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> int:
    """Width x height as the image's header declares them; no pixel data is decompressed.

    For budgets over several images (a request's total), checked before any of them is decoded.
    Same errors as :func:`decode_image` for empty, oversized or unrecognisable data.
    """
    if not data:
        raise InvalidArgumentError("image_bytes: empty (0 bytes)")
    if len(data) > max_bytes:
        raise ResourceExhaustedError(
            f"image_bytes: {len(data)} bytes, over the limit of {max_bytes} bytes", "max_image_bytes"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller's budget decides
        try:
            with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ResourceExhaustedError(f"image is too large to decode: {exc}", "max_image_pixels") from exc
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
            raise InvalidArgumentError(f"image_bytes: cannot decode image: {_describe(exc)}") from exc
    return width * height


def load_image_file(path: str | os.PathLike[str], **limits: int) -> Image.Image:
    """Read an image file and decode it with :func:`decode_image` (OSError if unreadable)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, **limits)


def to_mnist(image: Image.Image) -> np.ndarray:
    """An MNIST-style uint8 ``[28, 28]`` array (white digit on black) from any digit image."""
    gray = _to_grayscale(image)
    if gray.size == 0:
        raise InvalidArgumentError(f"image is {gray.shape[1]}x{gray.shape[0]}: no pixels")
    if np.median(_border(gray)) > 127:
        gray = 255.0 - gray
    ink = _remove_background(gray)
    peak = float(ink.max())
    if peak < _MIN_INK_LEVEL:
        raise InvalidArgumentError("image has no digit (blank)")
    ink *= 255.0 / peak
    digit = _fit_box(ink, DIGIT_BOX_PX)
    return _centre_by_mass(digit, MNIST_SIZE_PX)


def preprocess_bytes(data: bytes, **limits: int) -> np.ndarray:
    """Decode image bytes and preprocess them: uint8 ``[28, 28]``, white digit on black."""
    return to_mnist(decode_image(data, **limits))


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgumentError(f"image is {width}x{height}: zero width or height")
    pixels = width * height
    if pixels > max_pixels:
        raise ResourceExhaustedError(
            f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}", "max_image_pixels"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its text names an in-memory buffer object
        return f"not a recognised image format ({', '.join(_ALLOWED_FORMATS)})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _to_grayscale(image: Image.Image) -> np.ndarray:
    """Grayscale float32 ``[H, W]`` in 0..255, upright, alpha flattened onto white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not reject an otherwise fine image
        pass
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _wide_to_gray(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        image = flat
    try:
        gray = image.convert("L")
    except ValueError:  # modes without a direct path to L (LAB, HSV, ...)
        gray = image.convert("RGB").convert("L")
    return np.asarray(gray, dtype=np.float32)


def _wide_to_gray(image: Image.Image) -> np.ndarray:
    """16-bit / 32-bit / float grayscale scaled (not clipped) to 0..255."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(values * scale, 0.0, 255.0).astype(np.float32)


def _border(gray: np.ndarray) -> np.ndarray:
    """The outer ring of pixels: 2 px wide, or 1 px for images under 8 px."""
    width = 2 if min(gray.shape) >= 8 else 1
    ring = np.ones(gray.shape, dtype=bool)
    ring[width:-width, width:-width] = False
    return gray[ring]


def _remove_background(gray: np.ndarray) -> np.ndarray:
    """Subtract the background level (border median + 3 robust sigmas) and clip at 0."""
    border = _border(gray)
    median = float(np.median(border))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(border - median)))
    return np.clip(gray - (median + _NOISE_SIGMAS * sigma), 0.0, None)


def _fit_box(ink: np.ndarray, box_px: int) -> np.ndarray:
    """Crop to the ink and resize so its longer side is ``box_px`` (aspect kept, anti-aliased).

    The bounding box of the clear ink sets the scale; the crop keeps a fringe of
    ``_FRINGE_PX`` output pixels around it so faint anti-aliased edges are not cut off.
    Returns float32 with the ink peaking at 255.
    """
    strong = ink > _BBOX_FRACTION * 255.0
    rows = np.flatnonzero(strong.any(axis=1))
    cols = np.flatnonzero(strong.any(axis=0))
    long_side_px = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    scale = box_px / long_side_px
    fringe_px = int(np.ceil(_FRINGE_PX / scale))
    top, left = max(rows[0] - fringe_px, 0), max(cols[0] - fringe_px, 0)
    crop = ink[top : rows[-1] + 1 + fringe_px, left : cols[-1] + 1 + fringe_px]
    height, width = crop.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop.astype(np.float32)).resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    digit = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 255.0)
    peak = float(digit.max())
    if peak <= 0.0:
        raise InvalidArgumentError("image has no digit (blank)")
    return digit * (255.0 / peak)


def _centre_by_mass(digit: np.ndarray, canvas_px: int) -> np.ndarray:
    """Paste ``digit`` into a black canvas with its centre of mass at (canvas_px / 2, canvas_px / 2)."""
    visible = digit >= 0.5  # what survives rounding; the clipping below keeps exactly this inside
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    total = float(digit.sum())
    cy = float((digit.sum(axis=1) * np.arange(height)).sum()) / total
    cx = float((digit.sum(axis=0) * np.arange(width)).sum()) / total
    centre = canvas_px / 2
    top = min(max(int(np.floor(centre - cy + 0.5)), 0), canvas_px - height)
    left = min(max(int(np.floor(centre - cx + 0.5)), 0), canvas_px - width)
    canvas = np.zeros((canvas_px, canvas_px), dtype=np.float32)
    canvas[top : top + height, left : left + width] = digit
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
