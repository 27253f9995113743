"""What a training run prints: one line per epoch, the warnings that matter, nothing else.

The workers' own output (TensorFlow's start-up lines, Ray Train's reports, Python logging) stays
in Ray's log files: the driver does not stream it (``ray.init(log_to_driver=False)``). Instead
it watches the run's checkpoints, which carry every epoch's figures (``train_state.json``),
and prints each epoch once, plus a warning when a failed worker made Ray Train resume from a
checkpoint. TensorFlow's native start-up chatter in the driver itself (CUDA probing, CPU
feature notes, written before its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide
it) is filtered out of the driver's stderr while TensorFlow loads; anything else is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from training.loop import STATE_FILE

# Native lines TensorFlow writes while it loads, before its log level applies.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+\s+\d+ \S+\] .*"
    r"|To enable the following instructions: .*"
    r"|E\d{4} [\d:.]+\s+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit.*)$"
)


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    """One epoch's figures on one line."""
    return (
        f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} "
        f"test_acc {metrics['test_accuracy']:.4f} {metrics['epoch_s']:.1f}s "
        f"({metrics['images_per_s']:.0f} img/s)"
    )


class EpochPrinter:
    """Prints each epoch found in a run directory's newest checkpoint, once."""

    def __init__(self, run_dir: Path, epochs: int, out: TextIO | None = None) -> None:
        self.run_dir = run_dir
        self.epochs = epochs
        self.out = out or sys.stdout
        self.last_epoch = 0
        self.resumes_seen = 0

    def poll(self) -> None:
        """Print what is new since the last call (a checkpoint being written is read next time)."""
        state = self._newest_state()
        if state is None:
            return
        resumed = state.get("resumed_after_epochs", [])
        for epoch in resumed[self.resumes_seen :]:
            print(
                f"warning: a training worker failed; resumed from the checkpoint of epoch {epoch}",
                file=self.out,
            )
        self.resumes_seen = max(self.resumes_seen, len(resumed))
        for metrics in state.get("history", []):
            if metrics["epoch"] > self.last_epoch:
                print(format_epoch(metrics, self.epochs), file=self.out)
                self.last_epoch = metrics["epoch"]
        self.out.flush()

    def _newest_state(self) -> dict[str, Any] | None:
        try:
            states = sorted(self.run_dir.glob(f"checkpoint_*/{STATE_FILE}"), key=lambda p: p.parent.name)
        except OSError:
            return None
        for path in reversed(states):
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):  # being written, or already rotated away
                continue
        return None


@contextlib.contextmanager
def filtered_native_stderr(out: TextIO | None = None) -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there) and echo it minus start-up noise."""
    target = out or sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not _STARTUP_NOISE.match(line):
                    print(line, file=target)
            target.flush()
