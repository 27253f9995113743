"""Untrusted image bytes into a decoded image, under limits: the server's boundary for uploads.

:func:`decode_image` turns PNG/JPEG/... bytes from the network into a fully loaded ``PIL.Image``,
enforcing a byte limit and a pixel limit. The pixel count is read from the header, before any
pixel data is decompressed, so a tiny PNG that expands to gigabytes is refused cheaply; only the
raster formats in ``ALLOWED_FORMATS`` are opened. :func:`declared_pixels` reads the header alone,
for budgets over several images. Making the decoded image look like an MNIST digit is
:mod:`ray_app.preprocessing`'s job.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError

DEFAULT_MAX_IMAGE_PIXELS: int = 4_000_000  # decompression-bomb guard (width * height)
DEFAULT_MAX_IMAGE_BYTES: int = 4 * 1024 * 1024

# Raster formats we decode. Anything else (EPS, which runs Ghostscript, and rarer plugins) is
# refused: less attack surface for bytes that come from the network.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def _check_bytes(data: bytes, max_bytes: int) -> None:
    """Empty or over ``max_bytes``: refused before anything is decoded."""
    if not data:
        raise InvalidArgumentError("image_bytes: empty (0 bytes)")
    if len(data) > max_bytes:
        raise ResourceExhaustedError(
            f"image_bytes: {len(data)} bytes, over the limit of {max_bytes} bytes", "max_image_bytes"
        )


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
    _check_bytes(data, max_bytes)
    # Pillow's own bomb check warns (or raises) inside Image.open; turn the warning into an
    # error here only, leaving the global Image.MAX_IMAGE_PIXELS alone.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
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
    _check_bytes(data, max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller's budget decides
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
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
        return f"not a recognised image format ({', '.join(ALLOWED_FORMATS)})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
