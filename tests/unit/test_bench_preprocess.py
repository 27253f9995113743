"""bench/preprocess_cost.py runs and reports every kind of image (no Ray)."""

from __future__ import annotations

import time

from bench import preprocess_cost


def test_preprocess_cost_reports_each_kind(capsys) -> None:
    assert preprocess_cost.main(["--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["kind", "this"]
    kinds = [line.split()[0] for line in lines[1:]]
    assert kinds == list(preprocess_cost.images_by_kind())
    assert all(float(line.split()[1]) > 0 for line in lines[1:])


def test_median_ms_counts_failures_as_time_spent() -> None:
    def refuse_slowly(data: bytes):
        time.sleep(0.005)
        raise ValueError("blank")

    assert preprocess_cost.median_ms(refuse_slowly, [b"x", b"y"], repeats=2) >= 5.0
