"""What the training tests watch for in a run's checkpoint storage."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from training.run import CHECKPOINTS_DIR, RUN_SNAPSHOT_FILE


def first_checkpoint_registered(store: Path, run_name: str = "*") -> bool:
    """Ray Train's controller has taken epoch 1's checkpoint of run ``run_name`` (any run by
    default) in ``store`` (the files alone may still be unreported)."""
    for snapshot in store.glob(f"{CHECKPOINTS_DIR}/{run_name}/{RUN_SNAPSHOT_FILE}"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


@contextlib.contextmanager
def train_workers_killed_after_epoch_1(
    store: Path, run_name: str, candidates: Callable[[], list[psutil.Process]]
) -> Iterator[list[int]]:
    """While inside: SIGKILL the Ray Train workers among ``candidates()`` (one cluster's processes:
    other clusters on the machine are never touched) once run ``run_name`` has registered epoch 1's
    checkpoint. Yields the killed pids, filled in when it happens."""
    killed: list[int] = []
    stop = threading.Event()

    def kill() -> None:
        while not stop.is_set():
            if first_checkpoint_registered(store, run_name):
                for process in candidates():
                    with contextlib.suppress(psutil.Error):
                        if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                            process.send_signal(signal.SIGKILL)
                            killed.append(process.pid)
                if killed:
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=5)
