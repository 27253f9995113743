"""What a local Ray + Serve run can leave behind, found and stopped: Ray's head processes, HAProxy.

``ray stop`` ends Ray's processes by name, but HAProxy is not on its list: Serve kills it on a
clean ``serve shutdown``, and a run killed any other way can leave it holding the serving ports
(the next run's clients then reach a proxy with no replicas). Runs give HAProxy a state directory
of their own (:func:`new_state_dir`, given to :func:`ray_app.front_door.front_door_env`), so
they find exactly their own.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable

import psutil

RAY_HEAD_PROCESSES = ("gcs_server", "raylet")


# HAProxy refuses unix socket paths over 97 characters; Ray puts its sockets in
# <state dir>/<56-character node id>/admin.sock, which leaves 97 - 68 = 29 for the directory.
_MAX_STATE_DIR_CHARS = 97 - len("/") - 56 - len("/metrics.sock")
STATE_DIR_PREFIX = "mnist-ha-"


def new_state_dir() -> str:
    """A fresh, short directory for one run's HAProxy state (``front_door_env(state_dir=...)``):
    :func:`haproxy_processes` finds that run's HAProxy by it."""
    path = tempfile.mkdtemp(prefix=STATE_DIR_PREFIX, dir="/tmp" if os.path.isdir("/tmp") else None)
    if len(path) > _MAX_STATE_DIR_CHARS:
        os.rmdir(path)
        raise RuntimeError(f"{path} is too long for HAProxy's socket paths (at most {_MAX_STATE_DIR_CHARS})")
    return path


def _processes(match) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if match(process.info["name"] or "", process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def ray_head_processes() -> list[psutil.Process]:
    """Ray's head processes (gcs_server, raylet) of any local cluster."""
    return _processes(lambda name, _: name in RAY_HEAD_PROCESSES)


def ray_processes() -> list[psutil.Process]:
    """Every process of a local Ray: head processes and workers (replicas, actors: ``ray::...``)."""
    return _processes(
        lambda name, cmdline: name in RAY_HEAD_PROCESSES or bool(cmdline and cmdline[0].startswith("ray::"))
    )


def haproxy_processes(state_dir: str | None = None) -> list[psutil.Process]:
    """HAProxy processes; only those using ``state_dir`` when given."""
    return _processes(
        lambda name, cmdline: (
            name == "haproxy" and (state_dir is None or any(state_dir in a for a in cmdline))
        )
    )


def describe(processes: Iterable[psutil.Process]) -> list[str]:
    """``name (pid)`` of each process."""
    shown = []
    for process in processes:
        try:
            shown.append(f"{process.name()} ({process.pid})")
        except psutil.NoSuchProcess:
            continue
    return shown


def stop(processes: Iterable[psutil.Process], grace_s: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL after ``grace_s``; returns the processes still alive after that (none, normally)."""
    processes = list(processes)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    return alive


def wait_gone(find, timeout_s: float) -> list[psutil.Process]:
    """Poll ``find()`` until it returns nothing or ``timeout_s`` passes; returns what is left."""
    deadline = time.monotonic() + timeout_s
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = find()
    return left
