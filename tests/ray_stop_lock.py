"""The journey against the other integration modules' clusters: a readers-writer lock.

The README's main command (tests/integration/test_local_journey.py) refuses to start while another
Ray runs on the machine, and its clean-up, ``ray stop``, stops every Ray on the machine. The journey
runs first and everything else beside it: each other integration module holds this lock shared
while its cluster lives; the journey holds it exclusively while the pipeline checks for other Rays
and starts its own, and again for its clean-up. A waiting exclusive holder goes first (new shared
holders queue behind it, on a second file), so the journey is never starved by modules that keep
starting. The files are shared by the processes of one pytest-xdist run (their base temporary
directory's parent).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def lock_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ray-stop.lock"


@contextlib.contextmanager
def holding(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock at ``path`` (shared or exclusive) for the ``with`` block; waits for it."""
    with open(path.with_suffix(".queue"), "a") as queue, open(path, "a") as lock:
        fcntl.flock(queue, fcntl.LOCK_EX)  # one at a time through the door: a waiting writer holds it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(queue, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(queue, fcntl.LOCK_UN)
