"""The journey's ``ray stop`` against the other integration modules' clusters: a readers-writer lock.

``ray stop`` (the tutorial's clean-up, run by tests/integration/test_local_journey.py) stops every
Ray on the machine. The journey starts first and runs beside everything else; each other
integration module holds the lock shared while its cluster lives, and the journey takes it
exclusively for its clean-up only, so ``ray stop`` never meets another module's cluster. The lock
file is shared by the processes of one pytest-xdist run (their base temporary directory's parent).
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
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
