"""What training prints (training.console): one line per epoch from checkpoints, warnings,
and TensorFlow's native start-up noise filtered (no Ray, no TensorFlow)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from training.console import EpochPrinter, filtered_native_stderr, format_epoch
from training.loop import STATE_FILE


def _epoch(n: int) -> dict:
    return {
        "epoch": n,
        "loss": 0.1 / n,
        "accuracy": 0.9,
        "test_accuracy": 0.99,
        "epoch_s": 20.0,
        "images_per_s": 3000.0,
    }


def _checkpoint(run_dir: Path, name: str, epochs: int, resumed: list[int]) -> None:
    path = run_dir / f"checkpoint_{name}"
    path.mkdir(parents=True)
    state = {"history": [_epoch(n) for n in range(1, epochs + 1)], "resumed_after_epochs": resumed}
    (path / STATE_FILE).write_text(json.dumps(state))


def test_each_epoch_is_printed_once_and_a_resume_is_a_warning(tmp_path: Path) -> None:
    out = io.StringIO()
    printer = EpochPrinter(tmp_path, epochs=3, out=out)
    printer.poll()  # nothing yet
    _checkpoint(tmp_path, "2026-01-01_00-00-01", 1, [])
    printer.poll()
    printer.poll()
    _checkpoint(tmp_path, "2026-01-01_00-00-05", 3, [1])  # a worker died after epoch 1
    (tmp_path / "checkpoint_2026-01-01_00-00-09").mkdir()  # being written: no state yet
    printer.poll()
    assert out.getvalue().splitlines() == [
        format_epoch(_epoch(1), 3),
        "warning: a training worker failed; resumed from the checkpoint of epoch 1",
        format_epoch(_epoch(2), 3),
        format_epoch(_epoch(3), 3),
    ]
    assert (
        format_epoch(_epoch(2), 3) == "epoch 2/3: loss 0.0500 acc 0.9000 test_acc 0.9900 20.0s (3000 img/s)"
    )


def test_native_startup_noise_is_filtered_and_the_rest_kept() -> None:
    out = io.StringIO()
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796060555.083473   19085 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
        "E0000 00:00:1796060402.902699   16384 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow.",
    ]
    kept = [
        "E0000 00:00:1796060402.902699   16384 saver.cc:12] real trouble",
        "Traceback (most recent call last):",
    ]
    with filtered_native_stderr(out):
        for line in noise[:2] + kept[:1] + noise[2:] + kept[1:]:
            os.write(2, (line + "\n").encode())
    assert out.getvalue().splitlines() == kept
