"""MNIST-style preprocessing of an arbitrary digit image, photos included (numpy and Pillow only).

Shared by the server (uploaded images) and the client (building tensors). Untrusted bytes are
decoded under limits by :mod:`ray_app.image_decoding` first; :func:`preprocess_bytes` does both.

:func:`to_mnist` makes a decoded image look like an MNIST digit, the way the data set itself was
made (LeCun et al.: size-normalised into a 20x20 box with anti-aliasing, then centred by centre
of mass in a 28x28 field). Photos of paper are uneven (a lighting gradient, a shadow, tinted
paper, coloured ink, JPEG noise), so ink is found by its *contrast* with the local background,
not by a fixed grey level:

1. Apply the EXIF orientation, flatten any alpha channel onto white, keep colour (16-bit and
   float grey modes are scaled, not clipped). Shrink (area average) so the long side is at most
   256 px: every later step costs the same for a 12 Mpx photo as for a 256 px one.
2. Illumination: fit a smooth quadratic surface per colour channel to a 48 px thumbnail,
   robustly (iteratively re-fitted on the pixels it explains, so the ink, up to half of the
   image, does not pull it). That surface is the paper (or screen) as lit.
3. Ink strength. Polarity: ink is darker than the paper or lighter than a dark background; of
   the two, the one with more *thin*, clear contrast wins, so a large shadow or a lit area is
   never taken for ink (ink of the paper's own brightness is found by colour distance alone).
   Colour: the difference from the lit surface, projected on the ink's own colour direction,
   so a blue pen on grey paper or a red one on yellow paper counts fully and glare does not.
   Wide regions (a shadow's edge, found by a granulometry: grey openings of growing radius on
   a 64 px copy tell the strokes' width) are subtracted. Then the noise level (median plus
   three robust sigmas of the map) is subtracted; in images of 64 px or more, pixels whose 3x3
   neighbourhood does not also stand out (JPEG blocks, sensor noise) are dropped, and faint ink
   is kept only near clear ink (hysteresis), so residue away from the strokes cannot stretch
   the digit's box.
4. Blank only when no ink stands out: the strongest ink is below ``_MIN_INK_LEVEL`` grey levels
   above the noise, or fewer than ``_MIN_INK_PIXELS`` pixels carry it:
   :class:`~ray_app.protocol.status.InvalidArgumentError`.
5. Stroke width: MNIST strokes are 1.1-3.8 px wide in the 20 px box (1st-99th percentile,
   median 2.0). A hair-line pen on a large canvas is thickened, a fat marker thinned, by a
   grey-level dilation/erosion, towards that range. MNIST digits themselves are left alone.
6. Crop to the ink, scale so the box's longer side is 20 px (Lanczos, anti-aliased), keeping
   a 1 px (after scaling) fringe so faint edges survive; stretch so the ink peaks at 255.
7. Place it in a 28x28 black canvas so that its intensity-weighted centre of mass lands on
   (14, 14), clipping the shift so the digit stays inside the canvas.

An image that already is an MNIST digit comes out unchanged. Cost per image: see
``bench/preprocess_cost.py`` and bench/README.md (the work is bounded by the 256 px copy).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ray_app.image_decoding import decode_image
from ray_app.protocol.status import InvalidArgumentError

MNIST_SIZE_PX = 28
DIGIT_BOX_PX = 20

_WORK_MAX_PX = 256  # long side of the working copy
_THUMB_MAX_PX = 48  # long side of the thumbnail the illumination surface is fitted on
_SMOOTH_MIN_PX = 64  # images at least this small side are smoothed before finding ink
_MIN_INK_LEVEL = 24.0  # below this contrast (of 255) above the noise, nothing is drawn
_MIN_INK_PIXELS = 3
_BBOX_FRACTION = 0.2  # ink above this fraction of the maximum counts for the bounding box
_FRINGE_PX = 1  # faint ink kept around that box, in output pixels
_NOISE_SIGMAS = 3.0
_MAD_TO_SIGMA = 1.4826
_FIT_ROUNDS = 4
_FIT_SIGMAS = 2.5
_FIT_MIN_SIGMA = 2.0  # grey levels: a perfectly flat background still tolerates rounding
# Stroke width in output (20 px box) pixels: MNIST's 1st..99th percentile is 1.1..3.8, median 2.0.
_STROKE_MIN_PX, _STROKE_MAX_PX = 1.2, 4.0
_STROKE_THIN_TARGET_PX, _STROKE_THICK_TARGET_PX = 2.0, 3.0
_WIDE_MAX_PX = 64  # long side of the copy on which the strokes' width is measured
_WIDE_FINE_PX = 128  # long side of the copy on which wide regions (shadows) are found
_GRANULOMETRY_RADII = (1, 2, 3, 4, 6, 8, 11, 16)
_WIDE_MIN_SHARE = 0.05
_STRONG_FRACTION = 0.4  # of the peak: clear ink, which fainter ink must lie near
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_mnist(image: Image.Image) -> np.ndarray:
    """An MNIST-style uint8 ``[28, 28]`` array (white digit on black) from any digit image."""
    work = _working_copy(image)
    if work.size == 0:
        raise InvalidArgumentError(f"image is {image.size[0]}x{image.size[1]}: no pixels")
    strength = _ink_strength(work)
    ink = _remove_noise(strength)
    if min(strength.shape) >= _SMOOTH_MIN_PX:
        # Ink has support around it; an isolated noise speck (JPEG block, sensor) does not.
        ink *= _remove_noise(_box3(strength)) > 0.0
        ink = _near_strong_ink(ink)
    peak = float(ink.max())
    if peak < _MIN_INK_LEVEL or np.count_nonzero(ink >= 0.5 * peak) < _MIN_INK_PIXELS:
        raise InvalidArgumentError("image has no digit (blank)")
    ink *= 255.0 / peak
    ink = _normalise_stroke_width(ink)
    digit = _fit_box(ink, DIGIT_BOX_PX)
    return _centre_by_mass(digit, MNIST_SIZE_PX)


def preprocess_bytes(data: bytes, **limits: int) -> np.ndarray:
    """Decode image bytes and preprocess them: uint8 ``[28, 28]``, white digit on black."""
    return to_mnist(decode_image(data, **limits))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _working_copy(image: Image.Image) -> np.ndarray:
    """Float32 ``[H, W, C]`` in 0..255 (C = 3, or 1 for grey), upright, alpha flattened onto white,
    shrunk by area averaging so the long side is at most ``_WORK_MAX_PX``."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not reject an otherwise fine image
        pass
    if image.width == 0 or image.height == 0:
        return np.zeros((image.height, image.width, 1), dtype=np.float32)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_wide_to_gray(image), mode="F")
    elif _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        image = flat.convert("RGB")
    elif image.mode in ("L", "1", "P") and not _is_colour_palette(image):
        image = image.convert("L")
    else:
        try:
            image = image.convert("RGB")
        except ValueError:  # modes without a direct path to RGB
            image = image.convert("L")
    image = _shrink(image, _WORK_MAX_PX)
    array = np.asarray(image, dtype=np.float32)
    return array[..., None] if array.ndim == 2 else array


def _is_colour_palette(image: Image.Image) -> bool:
    if image.mode != "P":
        return False
    palette = np.asarray(image.getpalette() or [], dtype=np.int16).reshape(-1, 3)
    return bool(palette.size) and bool(np.any(palette.max(axis=1) != palette.min(axis=1)))


def _shrink(image: Image.Image, max_px: int) -> Image.Image:
    width, height = image.size
    scale = max_px / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BOX)


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


def _ink_strength(work: np.ndarray) -> np.ndarray:
    """How strongly each pixel is ink, in grey levels (see the module doc, step 3).

    Polarity: ink is darker than the paper, or lighter than a dark background; of the two, it is
    the one with more *thin* (stroke-like) contrast, so a large shadow or a lit area is not
    taken for ink. Colour: the difference from the lit background, projected on the ink's own
    colour direction, so a blue pen on grey paper counts fully; the other polarity (glare on a
    dark-ink page) is not ink. Wide regions (a shadow's edge) are removed.
    """
    diff = work - _illumination(work)
    luma = _LUMA if diff.shape[2] == 3 else np.ones(1, np.float32)
    brightness = diff @ luma
    best_thin, best_raw, best_sign, best_score = None, None, 1.0, -1.0
    for sign in (1.0, -1.0):
        contrast = np.maximum(sign * brightness, 0.0)
        raw = contrast - _wide_regions(contrast)
        thin = np.maximum(raw, 0.0)
        # Thin mass of clear contrast (not noise), weighted by the share of the contrast that is thin.
        thin_mass = float(np.maximum(thin - _MIN_INK_LEVEL, 0.0).sum())
        mass = float(np.maximum(contrast - _MIN_INK_LEVEL, 0.0).sum())
        score = thin_mass * thin_mass / mass if mass > 0.0 else 0.0
        if score > best_score:
            best_thin, best_raw, best_sign, best_score = thin, raw, sign, score
    if diff.shape[2] == 1:  # grey: the projection below would give exactly this again
        return best_raw.astype(np.float32)
    if best_score <= 0.0 and diff.shape[2] == 3:  # no clear brightness contrast: ink of the paper's
        distance = np.sqrt(np.mean(diff * diff, axis=2))  # brightness, told apart by colour alone
        best_thin = np.maximum(distance - _wide_regions(distance), 0.0)
    strong = best_thin > max(_MIN_INK_LEVEL, 0.5 * float(best_thin.max()))
    direction = diff[strong].mean(axis=0) if strong.any() else best_sign * luma
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        return np.zeros(brightness.shape, np.float32)
    projected = np.maximum(diff @ (direction / (norm * np.sqrt(diff.shape[2]))), 0.0)
    return (projected - _wide_regions(projected)).astype(np.float32)


def _wide_regions(ink: np.ndarray) -> np.ndarray:
    """The part of ``ink`` that is much wider than the strokes (a shadow edge), or zeros.

    Granulometry on a 64 px copy: grey openings of growing radius; the radius at which most ink
    vanishes is the strokes' half-width. An opening three times wider keeps only regions far
    wider than a stroke; below 5 % of the ink they are ignored (and clean images stay exact).
    """
    low = _resize_float(np.maximum(ink, 0.0), _WIDE_MAX_PX)
    total = float(low.sum())
    if total <= 0.0:
        return np.zeros_like(ink)
    previous, best_drop, stroke_radius, widest = total, 0.0, 0, None
    for radius in _GRANULOMETRY_RADII:
        if 2 * radius + 1 > min(low.shape):
            break
        widest = _opening(low, radius)
        mass = float(widest.sum())
        if previous - mass > best_drop:
            best_drop, stroke_radius = previous - mass, radius
        previous = mass
    if widest is not None and previous >= 0.5 * total:  # mostly wide: a lit area or a shadow, no strokes
        return _resize_float(widest, size=(ink.shape[1], ink.shape[0]), resample=Image.Resampling.BILINEAR)
    radius = 3 * stroke_radius
    if stroke_radius == 0 or 2 * radius + 1 > min(low.shape):
        return np.zeros_like(ink)
    # The wide regions themselves on a finer copy: a shadow's edge lands where it is.
    fine = _resize_float(np.maximum(ink, 0.0), _WIDE_FINE_PX)
    radius = round(radius * fine.shape[0] / low.shape[0])
    if 2 * radius + 1 > min(fine.shape):
        return np.zeros_like(ink)
    wide = _opening(fine, radius)
    if float(wide.sum()) < _WIDE_MIN_SHARE * float(fine.sum()):
        return np.zeros_like(ink)
    return _resize_float(wide, size=(ink.shape[1], ink.shape[0]), resample=Image.Resampling.BILINEAR)


def _resize_float(
    values: np.ndarray,
    max_px: int | None = None,
    size: tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.BOX,
) -> np.ndarray:
    """Resize a float map to ``size`` (width, height), or so its long side is at most ``max_px``."""
    image = Image.fromarray(values.astype(np.float32), mode="F")
    if size is None:
        image = _shrink(image, max_px or max(values.shape))
    else:
        image = image.resize(size, resample)
    return np.asarray(image, dtype=np.float32)


def _opening(values: np.ndarray, radius: int) -> np.ndarray:
    """Grey opening (erosion, then dilation) with a (2r+1)^2 square: removes narrower bright parts."""
    return _extreme_filter(_extreme_filter(values, radius, take_max=False), radius, take_max=True)


def _illumination(work: np.ndarray) -> np.ndarray:
    """The background as lit: a quadratic surface per channel, fitted robustly on a thumbnail."""
    height, width, channels = work.shape
    thumb = work
    scale = _THUMB_MAX_PX / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        thumb = np.stack(
            [
                np.asarray(Image.fromarray(work[..., c]).resize(size, Image.Resampling.BOX))
                for c in range(channels)
            ],
            axis=-1,
        )
    values = thumb.reshape(-1, channels).astype(np.float64)
    basis = _quadratic_basis(*thumb.shape[:2])
    fitted = np.broadcast_to(np.median(values, axis=0), values.shape)
    coef = np.zeros((basis.shape[1], channels))
    coef[0] = np.median(values, axis=0)
    for _ in range(_FIT_ROUNDS):
        residual = np.sqrt(np.mean((values - fitted) ** 2, axis=1))
        centre = float(np.median(residual))
        sigma = max(_MAD_TO_SIGMA * float(np.median(np.abs(residual - centre))), _FIT_MIN_SIGMA)
        inliers = residual <= centre + _FIT_SIGMAS * sigma
        if np.count_nonzero(inliers) < 2 * basis.shape[1]:
            break
        chosen = basis[inliers]
        try:  # normal equations: 6x6, well conditioned on -1..1 coordinates, 10x faster than lstsq
            coef = np.linalg.solve(chosen.T @ chosen, chosen.T @ values[inliers])
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(chosen, values[inliers], rcond=None)[0]
        fitted = basis @ coef
    return _quadratic_surface(coef, height, width)


def _quadratic_surface(coef: np.ndarray, height: int, width: int) -> np.ndarray:
    """``_quadratic_basis(height, width) @ coef`` as [H, W, C], built from outer products."""
    y = ((np.arange(height) + 0.5) / height * 2.0 - 1.0)[:, None, None]
    x = ((np.arange(width) + 0.5) / width * 2.0 - 1.0)[None, :, None]
    c = coef.astype(np.float32)
    surface = c[0] + x * c[1] + y * c[2] + (x * x) * c[3] + (x * y) * c[4] + (y * y) * c[5]
    return surface.astype(np.float32)


def _quadratic_basis(height: int, width: int) -> np.ndarray:
    """[1, x, y, x^2, xy, y^2] at pixel centres, x and y in -1..1 (the same for any resolution)."""
    y = (np.arange(height) + 0.5) / height * 2.0 - 1.0
    x = (np.arange(width) + 0.5) / width * 2.0 - 1.0
    yy, xx = np.meshgrid(y, x, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    return np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], axis=1)


def _box3(values: np.ndarray) -> np.ndarray:
    """3x3 mean (edges replicated)."""
    padded = np.pad(values, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _remove_noise(strength: np.ndarray) -> np.ndarray:
    """Subtract the noise level (median + 3 robust sigmas of the map, mostly background), clip at 0."""
    median = float(np.median(strength))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(strength - median)))
    return np.clip(strength - (median + _NOISE_SIGMAS * sigma), 0.0, None)


def _near_strong_ink(ink: np.ndarray) -> np.ndarray:
    """Keep faint ink only near clear ink (hysteresis): faint residue of paper texture or of a
    shadow's edge, away from the strokes, would otherwise stretch the digit's bounding box."""
    peak = float(ink.max())
    if peak <= 0.0:
        return ink
    strong = (ink >= _STRONG_FRACTION * peak).astype(np.float32)
    radius = max(2, round(max(ink.shape) / _WIDE_MAX_PX))
    return ink * (_extreme_filter(strong, radius, take_max=True) > 0.0)


def _extreme_filter(values: np.ndarray, radius: int, take_max: bool) -> np.ndarray:
    """Grey-level dilation (max) or erosion (min) over a (2r+1)^2 square, separably.

    Hand-written because Pillow's rank filters cost O(size^2) per pixel (15 ms for a 5x5 min
    on 256x256) and scipy.ndimage is not a dependency. Per axis, the extreme over a window of
    w = 2r+1 is built by doubling (windows of 1, 2, 4, ... k <= w) and two overlapping windows
    of k: about log2(w) array operations instead of w.
    """
    pick = np.maximum if take_max else np.minimum
    fill = 0.0 if take_max else float(values.max())
    window = 2 * radius + 1
    out = values
    for _ in range(2):  # rows, then (transposed) columns
        size = out.shape[0]
        padded = np.full((size + 2 * radius, *out.shape[1:]), fill, dtype=out.dtype)
        padded[radius : radius + size] = out
        span, extreme = 1, padded  # extreme[i] = the extreme of padded[i : i + span]
        while 2 * span <= window:
            extreme = pick(extreme[:-span], extreme[span:])
            span *= 2
        out = pick(extreme[:size], extreme[window - span : window - span + size]).T
    return out


def _stroke_width_px(ink: np.ndarray) -> float:
    """Mean stroke width of the ink (above half its peak), in pixels: area / half the perimeter."""
    mask = ink >= 0.5 * float(ink.max())
    area = int(np.count_nonzero(mask))
    edges = (
        np.count_nonzero(mask[1:] != mask[:-1])
        + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
        + np.count_nonzero(mask[0])
        + np.count_nonzero(mask[-1])
        + np.count_nonzero(mask[:, 0])
        + np.count_nonzero(mask[:, -1])
    )
    return area / max(edges / 2.0, 1.0)


def _normalise_stroke_width(ink: np.ndarray) -> np.ndarray:
    """Thicken hair-lines and thin fat marker strokes towards MNIST's widths (see module doc)."""
    rows, cols = _ink_extent(ink)
    long_side_px = max(rows[1] - rows[0], cols[1] - cols[0]) + 1
    scale = DIGIT_BOX_PX / long_side_px
    width_px = _stroke_width_px(ink)
    width_out = width_px * scale
    if width_out < _STROKE_MIN_PX:
        radius = round((_STROKE_THIN_TARGET_PX / scale - width_px) / 2.0)
        return _extreme_filter(ink, radius, take_max=True) if radius >= 1 else ink
    if width_out > _STROKE_MAX_PX:
        # Never erode more than a third of the stroke: thin parts of the same digit must survive.
        radius = min(round((width_px - _STROKE_THICK_TARGET_PX / scale) / 2.0), int(width_px / 6.0))
        if radius >= 1:
            thinned = _extreme_filter(ink, radius, take_max=False)
            if float(thinned.max()) > 0.0:
                return thinned * (255.0 / float(thinned.max()))
    return ink


def _ink_extent(ink: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    strong = ink > _BBOX_FRACTION * float(ink.max())
    rows = np.flatnonzero(strong.any(axis=1))
    cols = np.flatnonzero(strong.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def _fit_box(ink: np.ndarray, box_px: int) -> np.ndarray:
    """Crop to the ink and resize so its longer side is ``box_px`` (aspect kept, anti-aliased).

    The bounding box of the clear ink sets the scale; the crop keeps a fringe of
    ``_FRINGE_PX`` output pixels around it so faint anti-aliased edges are not cut off.
    Returns float32 with the ink peaking at 255.
    """
    (top_px, bottom_px), (left_px, right_px) = _ink_extent(ink)
    long_side_px = max(bottom_px - top_px, right_px - left_px) + 1
    scale = box_px / long_side_px
    fringe_px = int(np.ceil(_FRINGE_PX / scale))
    top, left = max(top_px - fringe_px, 0), max(left_px - fringe_px, 0)
    crop = ink[top : bottom_px + 1 + fringe_px, left : right_px + 1 + fringe_px]
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
