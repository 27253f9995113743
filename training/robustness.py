"""The robustness set: non-MNIST digit images in the kinds users send, and accuracy on them.

Four categories, each image synthesised from :mod:`training.handwriting` (strokes, not fonts)
and encoded as a user's file would be:

``drawn``
    a digit drawn with a mouse or stylus: 96-400 px canvases, random pen widths (3-14 % of the
    digit's height) and ink colours, mostly on white, some on light grey or black; PNG.
``marker``
    a thick marker or a finger on a phone-sized canvas (400-1000 px): fat strokes (10-22 %),
    anywhere on the canvas, white, off-white or dark-mode backgrounds; PNG or JPEG.
``small_dark``
    small light-on-dark images (16-48 px), e.g. a crop from a screen; PNG or JPEG.
``photo``
    ink on paper, photographed: tinted paper (cream, grey, yellow, blue, pink, kraft), coloured
    ink or pencil, uneven light (gradient, vignetting, a soft shadow), paper texture, slight
    rotation, focus blur, sensor noise, JPEG 40-90.

Image ``i`` of a category is drawn from ``numpy.random.default_rng([seed, category, i])``, so a
set is the same on every machine and a smaller set is a prefix of a larger one. Labels cycle
0-9. Evaluation runs what users get: encoded bytes -> :func:`ray_app.preprocessing.preprocess_bytes`
-> the SavedModel's ``serving_default``; an image the preprocessing rejects counts as a miss.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ray_app.preprocessing import preprocess_bytes
from ray_app.protocol.status import ServingError
from training.handwriting import Pen, digit_paths, render

CATEGORIES: tuple[str, ...] = ("drawn", "marker", "small_dark", "photo")
DEFAULT_PER_CATEGORY = 750  # 3,000 images in all
DEFAULT_SEED = 20261130

_PAPERS = (  # photographed paper colours (RGB reflectance, 0..255)
    (246, 246, 240),
    (242, 232, 205),
    (200, 200, 196),
    (238, 226, 160),
    (205, 218, 238),
    (242, 212, 218),
    (212, 232, 204),
    (205, 175, 135),
)
_INKS = (  # pen colours on paper
    (25, 25, 30),
    (30, 50, 170),
    (20, 30, 100),
    (180, 30, 40),
    (30, 120, 60),
    (95, 40, 145),
    (105, 105, 110),  # pencil
)


@dataclass(frozen=True)
class Sample:
    """One image of the set: its category, the digit it shows and its encoded file bytes."""

    category: str
    label: int
    data: bytes


@dataclass(frozen=True)
class Prepared:
    """A preprocessed set: uint8 ``images`` [N, 28, 28] where ``ok``, labels and categories."""

    images: np.ndarray
    labels: np.ndarray
    categories: np.ndarray
    ok: np.ndarray  # False where preprocessing rejected the image (a miss)


def _encode(rgb: np.ndarray, rng: np.random.Generator, jpeg_share: float, quality: tuple[int, int]) -> bytes:
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    if rng.random() < jpeg_share:
        image.save(buffer, format="JPEG", quality=int(rng.integers(*quality)))
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _compose(coverage: np.ndarray, background: Sequence[float], ink: Sequence[float]) -> np.ndarray:
    cov = coverage[..., None]
    return np.asarray(background, np.float32) * (1.0 - cov) + np.asarray(ink, np.float32) * cov


def _place(rng: np.random.Generator, size_px: tuple[int, int], height_px: float) -> tuple[float, float]:
    """A random centre that keeps a digit ``height_px`` tall (and about as wide) on the canvas."""
    width, height = size_px
    margin_x, margin_y = min(0.45 * height_px, width / 2), min(0.55 * height_px, height / 2)
    return (float(rng.uniform(margin_x, width - margin_x)), float(rng.uniform(margin_y, height - margin_y)))


def _drawn(label: int, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(96, 401))
    size = (side, int(side * rng.uniform(0.8, 1.25)))
    height_px = rng.uniform(0.5, 0.85) * min(size)
    paths = digit_paths(label, rng)
    pen = Pen(width=float(rng.uniform(0.03, 0.14)), pressure=float(rng.uniform(0.0, 0.3)))
    coverage = render(paths, pen, size, height_px, _place(rng, size, height_px), rng, supersample=2)
    kind = rng.random()
    if kind < 0.7:
        background, ink = (255.0,) * 3, rng.choice([(0, 0, 0), (40, 40, 40), (20, 40, 160), (160, 20, 20)])
    elif kind < 0.85:
        background, ink = (rng.uniform(200, 240),) * 3, (rng.uniform(0, 60),) * 3
    else:
        background, ink = (0.0,) * 3, (255.0,) * 3
    return _encode(_compose(coverage, background, ink), rng, jpeg_share=0.0, quality=(90, 91))


def _marker(label: int, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(400, 1001))
    size = (side, int(side * rng.choice([1.0, 1.33, 1.78])))
    height_px = rng.uniform(0.35, 0.9) * min(size)
    paths = digit_paths(label, rng)
    pen = Pen(width=float(rng.uniform(0.10, 0.22)), pressure=float(rng.uniform(0.0, 0.1)))
    coverage = render(paths, pen, size, height_px, _place(rng, size, height_px), rng)
    kind = rng.random()
    if kind < 0.5:
        background, ink = (
            (255.0,) * 3,
            tuple(rng.choice([(0, 0, 0), (30, 30, 200), (200, 30, 30), (20, 140, 60)])),
        )
    elif kind < 0.75:
        background, ink = tuple(rng.uniform(225, 255, 3)), tuple(rng.uniform(0, 90, 3))
    else:
        background, ink = tuple(rng.uniform(0, 40, 3)), tuple(rng.uniform(180, 255, 3))
    return _encode(_compose(coverage, background, ink), rng, jpeg_share=0.3, quality=(70, 96))


def _small_dark(label: int, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(16, 49))
    size = (side, side)
    height_px = rng.uniform(0.55, 0.9) * side
    paths = digit_paths(label, rng)
    pen = Pen(width=float(rng.uniform(0.08, 0.18)), pressure=0.1)
    coverage = render(paths, pen, size, height_px, _place(rng, size, height_px), rng, supersample=4)
    background = tuple(rng.uniform(0, 60, 3))
    ink = tuple(rng.uniform(170, 255, 3))
    return _encode(_compose(coverage, background, ink), rng, jpeg_share=0.4, quality=(75, 96))


def _lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Illumination factor [H, W] in about 0.35..1: gradient, vignetting, maybe a soft shadow.

    Computed on a grid 8 times coarser and interpolated: light varies slowly (and it is 10x cheaper).
    """
    coarse_h, coarse_w = max(2, height // 8), max(2, width // 8)
    y, x = np.mgrid[0:coarse_h, 0:coarse_w].astype(np.float32)
    x, y = (x + 0.5) / coarse_w - 0.5, (y + 0.5) / coarse_h - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.75, 1.0) + rng.uniform(0.0, 0.45) * (np.cos(angle) * x + np.sin(angle) * y)
    light -= rng.uniform(0.0, 0.35) * (x * x + y * y)
    if rng.random() < 0.4:  # the shadow of a hand or a phone: a soft-edged half-plane
        angle = rng.uniform(0, 2 * np.pi)
        distance = np.cos(angle) * x + np.sin(angle) * y - rng.uniform(-0.3, 0.3)
        softness = rng.uniform(0.03, 0.15)
        light *= 1.0 - rng.uniform(0.15, 0.45) * (1.0 / (1.0 + np.exp(-distance / softness)))
    light = Image.fromarray(np.clip(light, 0.3, 1.1).astype(np.float32), mode="F")
    return np.asarray(light.resize((width, height), Image.Resampling.BILINEAR))


def _photo(label: int, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(360, 961))
    size = (side, int(side * rng.choice([0.75, 1.0, 1.33])))
    width, height = size
    height_px = rng.uniform(0.3, 0.7) * min(size)
    paths = digit_paths(label, rng)
    turn = np.radians(rng.uniform(-10.0, 10.0))  # the camera is not quite square to the paper
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    paths = [p @ rotation.T for p in paths]
    pen = Pen(width=float(rng.uniform(0.035, 0.1)), pressure=float(rng.uniform(0.05, 0.3)))
    coverage = render(paths, pen, size, height_px, _place(rng, size, height_px), rng)
    paper = np.asarray(_PAPERS[int(rng.integers(len(_PAPERS)))], np.float32) * rng.uniform(0.88, 1.0)
    ink = np.asarray(_INKS[int(rng.integers(len(_INKS)))], np.float32) + rng.uniform(-15, 15, 3)
    ink *= rng.uniform(0.9, 1.3) if ink.mean() > 90 else 1.0  # pencil and light inks vary most
    texture = np.asarray(
        Image.fromarray(rng.normal(0.0, 1.0, (12, 12)).astype(np.float32)).resize(
            size, Image.Resampling.BICUBIC
        )
    )
    reflectance = _compose(coverage, paper, np.clip(ink, 0, 255)) * (1.0 + 0.025 * texture[..., None])
    rgb = reflectance * _lighting(rng, height, width)[..., None]
    blur_px = rng.uniform(0.0, 0.003) * side
    if blur_px > 0.4:  # out of focus (Pillow blurs 8-bit images only)
        image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
        rgb = np.asarray(image.filter(ImageFilter.GaussianBlur(blur_px)), dtype=np.float32)
    rgb = rgb + rng.uniform(1.5, 8.0) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return _encode(rgb, rng, jpeg_share=1.0, quality=(40, 91))


_MAKERS: dict[str, Callable[[int, np.random.Generator], bytes]] = {
    "drawn": _drawn,
    "marker": _marker,
    "small_dark": _small_dark,
    "photo": _photo,
}


def make_sample(category: str, index: int, seed: int = DEFAULT_SEED) -> Sample:
    """Image ``index`` of ``category`` (deterministic in ``seed``, ``category`` and ``index``)."""
    if category not in _MAKERS:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    rng = np.random.default_rng([seed, CATEGORIES.index(category), index])
    label = index % 10
    return Sample(category, label, _MAKERS[category](label, rng))


def generate(
    per_category: int = DEFAULT_PER_CATEGORY, seed: int = DEFAULT_SEED, categories: Sequence[str] = CATEGORIES
) -> Iterator[Sample]:
    """``per_category`` images of each category, category by category."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    for category in categories:
        for index in range(per_category):
            yield make_sample(category, index, seed)


def _prepared_part(task: tuple[str, int, int, int]) -> Prepared:
    category, start, stop, seed = task
    return prepare(make_sample(category, index, seed) for index in range(start, stop))


def build(
    per_category: int = DEFAULT_PER_CATEGORY, seed: int = DEFAULT_SEED, workers: int | None = None
) -> Prepared:
    """:func:`generate` then :func:`prepare`, spread over ``workers`` processes (default: all CPUs).

    Every image comes from its own random generator, so the result is the same for any number
    of workers, in the same order.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    workers = workers or os.cpu_count() or 1
    chunk = max(1, -(-per_category * len(CATEGORIES) // (4 * workers)))  # about 4 tasks per worker
    tasks = [
        (c, i, min(i + chunk, per_category), seed) for c in CATEGORIES for i in range(0, per_category, chunk)
    ]
    if workers == 1 or len(tasks) == 1:
        parts = [_prepared_part(task) for task in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the caller may hold threads (Ray, TensorFlow) that a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_prepared_part, tasks))
    return Prepared(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.categories for p in parts]),
        np.concatenate([p.ok for p in parts]),
    )


def prepare(samples: Sequence[Sample] | Iterator[Sample]) -> Prepared:
    """Preprocess every sample as the server would; rejected images are kept as misses."""
    images, labels, categories, ok = [], [], [], []
    for sample in samples:
        try:
            images.append(preprocess_bytes(sample.data))
            ok.append(True)
        except ServingError:
            images.append(np.zeros((28, 28), np.uint8))
            ok.append(False)
        labels.append(sample.label)
        categories.append(sample.category)
    return Prepared(np.stack(images), np.asarray(labels), np.asarray(categories), np.asarray(ok))


def accuracy_by_category(prepared: Prepared, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy per category plus ``overall`` (all images); rejected images count as wrong."""
    correct = (predicted == prepared.labels) & prepared.ok
    result = {
        str(c): float(np.mean(correct[prepared.categories == c])) for c in dict.fromkeys(prepared.categories)
    }
    result["overall"] = float(np.mean(correct))
    return result
