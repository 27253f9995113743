"""Synthetic handwriting: digits drawn stroke by stroke with a random hand and a random pen.

No fonts: every digit is a few stroke skeletons (control points in a unit box, several
common ways of writing each digit: a 1 with or without flag and base, a 7 with or without a
crossbar, an open or closed 4, a 9 with a straight or curved tail, ...). A hand perturbs
them (slant, rotation, aspect, jittered control points, tremor along the path) and a pen draws
them as a smooth Catmull-Rom path with its own width and pressure. The result is a coverage
mask in 0..1 that :mod:`training.robustness` puts on paper, screens and photos.

Everything is drawn from the ``numpy.random.Generator`` passed in: same generator state, same
digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Stroke = tuple[tuple[float, float], ...]  # control points (x right, y down) in a unit box
Style = tuple[Stroke, ...]


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, start_deg: float, sweep_deg: float, n: int
) -> Stroke:
    angles = np.radians(start_deg + np.linspace(0.0, sweep_deg, n))
    return tuple((cx + rx * float(np.cos(a)), cy + ry * float(np.sin(a))) for a in angles)


# Ways of writing each digit. Angles: 0 deg = right, 90 deg = down (y grows downwards).
STYLES: dict[int, tuple[Style, ...]] = {
    0: (
        (_ellipse(0.5, 0.5, 0.3, 0.48, -90, -370, 12),),
        (_ellipse(0.5, 0.5, 0.26, 0.48, -80, 360, 12),),
    ),
    1: (
        (((0.5, 0.0), (0.5, 1.0)),),
        (((0.28, 0.22), (0.52, 0.0), (0.5, 1.0)),),
        (((0.3, 0.2), (0.52, 0.0), (0.5, 1.0)), ((0.28, 1.0), (0.74, 1.0))),
    ),
    2: (
        (((0.18, 0.25), (0.35, 0.03), (0.65, 0.03), (0.8, 0.25), (0.65, 0.55), (0.18, 1.0), (0.85, 1.0)),),
        (
            (
                (0.2, 0.22),
                (0.45, 0.0),
                (0.78, 0.15),
                (0.7, 0.5),
                (0.3, 0.85),
                (0.18, 0.98),
                (0.35, 0.92),
                (0.6, 0.97),
                (0.85, 0.95),
            ),
        ),
    ),
    3: (
        (
            ((0.2, 0.12), (0.5, 0.0), (0.8, 0.15), (0.72, 0.38), (0.42, 0.5)),
            ((0.42, 0.5), (0.78, 0.6), (0.84, 0.85), (0.55, 1.0), (0.18, 0.9)),
        ),
        (
            ((0.18, 0.0), (0.82, 0.0), (0.42, 0.42)),
            ((0.42, 0.42), (0.8, 0.58), (0.82, 0.85), (0.5, 1.0), (0.15, 0.88)),
        ),
    ),
    4: (
        (((0.62, 0.0), (0.12, 0.66), (0.88, 0.66)), ((0.66, 0.3), (0.66, 1.0))),
        (((0.22, 0.0), (0.15, 0.6), (0.85, 0.6)), ((0.7, 0.0), (0.7, 1.0))),
    ),
    5: (
        (
            ((0.78, 0.0), (0.28, 0.0)),
            ((0.3, 0.0), (0.24, 0.45), (0.55, 0.37), (0.8, 0.55), (0.8, 0.8), (0.5, 1.0), (0.18, 0.9)),
        ),
        (((0.8, 0.02), (0.3, 0.0), (0.25, 0.45), (0.6, 0.38), (0.82, 0.65), (0.6, 0.97), (0.2, 0.9)),),
    ),
    6: (
        (
            (
                (0.72, 0.0),
                (0.4, 0.2),
                (0.2, 0.6),
                (0.3, 0.95),
                (0.6, 1.0),
                (0.8, 0.75),
                (0.6, 0.5),
                (0.3, 0.58),
                (0.22, 0.75),
            ),
        ),
        (
            (
                (0.6, 0.0),
                (0.3, 0.35),
                (0.22, 0.75),
                (0.45, 1.0),
                (0.75, 0.85),
                (0.7, 0.55),
                (0.4, 0.55),
                (0.24, 0.72),
            ),
        ),
    ),
    7: (
        (((0.12, 0.0), (0.88, 0.0), (0.4, 1.0)),),
        (((0.12, 0.0), (0.88, 0.0), (0.42, 1.0)), ((0.35, 0.5), (0.78, 0.5))),
        (((0.12, 0.15), (0.15, 0.0), (0.88, 0.02), (0.55, 0.5), (0.45, 1.0)),),
    ),
    8: (
        (
            (
                (0.72, 0.12),
                (0.5, 0.0),
                (0.25, 0.14),
                (0.33, 0.38),
                (0.67, 0.6),
                (0.76, 0.86),
                (0.5, 1.0),
                (0.24, 0.86),
                (0.33, 0.6),
                (0.67, 0.38),
                (0.75, 0.14),
                (0.52, 0.0),
            ),
        ),
        (_ellipse(0.5, 0.23, 0.22, 0.23, -90, 360, 10), _ellipse(0.5, 0.72, 0.28, 0.28, -90, 360, 10)),
    ),
    9: (
        (_ellipse(0.48, 0.28, 0.27, 0.28, 0, -360, 11), ((0.75, 0.28), (0.72, 0.65), (0.68, 1.0))),
        (
            _ellipse(0.5, 0.28, 0.28, 0.28, 10, -360, 11),
            ((0.77, 0.35), (0.72, 0.75), (0.5, 1.0), (0.28, 0.9)),
        ),
    ),
}


@dataclass(frozen=True)
class Pen:
    """How the digit is drawn: stroke width as a fraction of the digit's height, pressure swing."""

    width: float
    pressure: float = 0.15  # relative width variation along a stroke


def _catmull_rom(points: np.ndarray, samples_per_segment: int) -> np.ndarray:
    """A smooth path through ``points`` [N, 2] (ends repeated), ``samples_per_segment`` per gap."""
    if len(points) < 2:
        return points
    padded = np.vstack([points[:1], points, points[-1:]])
    t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    parts = []
    for i in range(len(points) - 1):
        p0, p1, p2, p3 = padded[i : i + 4]
        parts.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    parts.append(points[-1:])
    return np.vstack(parts)


def _hand_transform(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A random 2x2 matrix: slant, rotation and aspect of one writer."""
    slant = rng.uniform(-0.35, 0.35) * strength
    angle = np.radians(rng.uniform(-12.0, 12.0) * strength)
    aspect = np.exp(rng.uniform(-0.3, 0.25) * strength)
    shear = np.array([[1.0, -slant], [0.0, 1.0]])
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotate @ shear @ np.diag([aspect, 1.0])


def digit_paths(digit: int, rng: np.random.Generator, strength: float = 1.0) -> list[np.ndarray]:
    """The strokes of one written ``digit`` as dense paths [M, 2], digit height about 1, centred."""
    styles = STYLES[digit]
    style = styles[int(rng.integers(len(styles)))]
    matrix = _hand_transform(rng, strength)
    jitter = 0.035 * strength
    paths = []
    for stroke in style:
        points = np.asarray(stroke, dtype=np.float64) - 0.5
        points = points + rng.normal(0.0, jitter, points.shape)
        path = _catmull_rom(points, 12)
        # Tremor: a slow wobble across the path (two random sinusoids).
        s = np.linspace(0.0, 1.0, len(path))[:, None]
        for _ in range(2):
            phase, freq = rng.uniform(0, 2 * np.pi, 2), rng.uniform(1.0, 4.0)
            path = path + 0.008 * strength * np.sin(2 * np.pi * freq * s + phase)
        paths.append(path @ matrix.T)
    return paths


def render(
    paths: list[np.ndarray],
    pen: Pen,
    size_px: tuple[int, int],
    height_px: float,
    centre_px: tuple[float, float],
    rng: np.random.Generator,
    supersample: int = 1,
) -> np.ndarray:
    """Coverage float32 [H, W] in 0..1 of ``paths`` drawn ``height_px`` tall around ``centre_px``."""
    width_px, canvas_height_px = size_px
    k = supersample
    mask = Image.new("L", (width_px * k, canvas_height_px * k), 0)
    draw = ImageDraw.Draw(mask)
    base_radius = max(0.5 * pen.width * height_px * k, 0.6 * k)
    for path in paths:
        xy = (path * height_px + np.asarray(centre_px)) * k
        # Resample so consecutive points are at most half a radius apart.
        lengths = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        total = float(lengths.sum())
        n = max(2, int(total / max(base_radius * 0.5, 0.5)) + 1)
        along = np.concatenate([[0.0], np.cumsum(lengths)])
        targets = np.linspace(0.0, total, n)
        xy = np.stack([np.interp(targets, along, xy[:, 0]), np.interp(targets, along, xy[:, 1])], axis=1)
        phase = rng.uniform(0, 2 * np.pi)
        radii = base_radius * (
            1.0 + pen.pressure * np.sin(np.linspace(0, np.pi * rng.uniform(1, 3), n) + phase)
        )
        for (x, y), r in zip(xy, radii):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    if k > 1:
        mask = mask.resize((width_px, canvas_height_px), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0
