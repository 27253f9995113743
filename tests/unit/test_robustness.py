"""The synthesised robustness set (training.robustness, training.handwriting): deterministic,
in the promised categories and formats, and scored the way users are served (no Ray, no TF)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training import robustness
from training.handwriting import STYLES, Pen, digit_paths, render


def _open(sample: robustness.Sample) -> Image.Image:
    return Image.open(io.BytesIO(sample.data))


def test_same_seed_same_images_and_a_smaller_set_is_a_prefix() -> None:
    small = list(robustness.generate(3))
    large = list(robustness.generate(5))
    assert [s.data for s in small] == [s.data for s in large if s.label < 3]
    assert robustness.make_sample("photo", 2).data == robustness.make_sample("photo", 2).data
    assert robustness.make_sample("photo", 2).data != robustness.make_sample("photo", 2, seed=1).data


def test_categories_labels_and_file_kinds() -> None:
    samples = list(robustness.generate(10))
    assert [s.category for s in samples] == [c for c in robustness.CATEGORIES for _ in range(10)]
    assert [s.label for s in samples[:10]] == list(range(10))
    by_category = {c: [_open(s) for s in samples if s.category == c] for c in robustness.CATEGORIES}
    assert all(max(im.size) <= 48 for im in by_category["small_dark"])
    assert all(max(im.size) >= 400 for im in by_category["marker"])
    assert all(im.format == "JPEG" and max(im.size) >= 360 for im in by_category["photo"])
    assert all(im.format == "PNG" for im in by_category["drawn"])
    # Light-on-dark: the background (most pixels) is much darker than the ink.
    for im in by_category["small_dark"]:
        grey = np.asarray(im.convert("L"), dtype=float)
        assert np.median(grey) < grey.max() - 80


def test_every_digit_has_several_ways_of_writing_it() -> None:
    assert sorted(STYLES) == list(range(10))
    assert all(len(styles) >= 2 for styles in STYLES.values())


def test_the_hand_varies_the_strokes() -> None:
    first = digit_paths(7, np.random.default_rng(1))
    second = digit_paths(7, np.random.default_rng(2))
    assert not all(a.shape == b.shape and np.allclose(a, b) for a, b in zip(first, second))
    size = max(float(np.ptp(np.vstack(first)[:, 1])), float(np.ptp(np.vstack(second)[:, 1])))
    assert 0.7 < size < 1.4  # about one digit height


def test_render_draws_the_pen_width_asked_for() -> None:
    rng = np.random.default_rng(0)
    paths = [np.array([[0.0, -0.5], [0.0, 0.5]])]  # a vertical bar, one digit height
    coverage = render(paths, Pen(width=0.1, pressure=0.0), (200, 200), 100.0, (100.0, 100.0), rng)
    row = coverage[100]
    assert 9 <= int((row > 0.5).sum()) <= 11  # 10 % of a 100 px digit
    assert coverage.min() == 0.0 and coverage.max() == 1.0


def test_unknown_category_and_empty_set_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown category"):
        robustness.make_sample("font", 0)
    with pytest.raises(ValueError, match="per_category"):
        list(robustness.generate(0))


def test_prepare_and_score_count_rejected_images_as_misses() -> None:
    blank = io.BytesIO()
    Image.new("L", (50, 50), 255).save(blank, format="PNG")
    samples = [robustness.make_sample("drawn", 0), robustness.Sample("drawn", 1, blank.getvalue())]
    prepared = robustness.prepare(samples)
    assert prepared.images.shape == (2, 28, 28) and prepared.images.dtype == np.uint8
    assert prepared.ok.tolist() == [True, False]
    # Even a "correct" guess for the rejected image does not count: users got an error.
    scores = robustness.accuracy_by_category(prepared, np.array([0, 1]))
    assert scores == {"drawn": 0.5, "overall": 0.5}
    scores = robustness.accuracy_by_category(prepared, np.array([3, 1]))
    assert scores == {"drawn": 0.0, "overall": 0.0}


def test_build_in_parallel_is_generate_then_prepare() -> None:
    serial = robustness.prepare(robustness.generate(3))
    parallel = robustness.build(3, workers=2)
    np.testing.assert_array_equal(parallel.images, serial.images)
    np.testing.assert_array_equal(parallel.labels, serial.labels)
    assert parallel.categories.tolist() == serial.categories.tolist()
    assert parallel.ok.tolist() == serial.ok.tolist()
