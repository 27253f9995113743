"""The benchmark's server processes: each started in its own session, stopped in order (the
leader first, then its process group, then whatever is left of the session), and their CPU time
counted by component (psutil)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def session_pids(sid: int) -> list[int]:
    """PIDs still alive in session ``sid`` (the processes a Popen(start_new_session=True) left)."""
    pids = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to ask about
            if os.getsid(process.pid) == sid:
                pids.append(process.pid)
    return pids


# Runs first in the child: a shell's `cmd &` starts us with SIGINT ignored, and an ignored signal
# stays ignored across exec, so `serve run` would never see our SIGINT. Restore it, then exec.
_RESTORE_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start_server(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (so it and its children can be stopped together)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _RESTORE_SIGINT, *cmd],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_session(proc: subprocess.Popen[bytes], grace_s: float) -> str:
    """Stop a server started with ``start_new_session=True``; say how it ended.

    SIGINT goes to the leader first (``serve run`` then shuts Serve and its local cluster down
    in order: a group-wide SIGINT would also hit the cluster's GCS and raylet underneath it),
    then to the whole process group, then SIGTERM and SIGKILL; whatever is left of the session
    afterwards is killed.
    """
    sid = proc.pid  # the child leads its own session and process group
    how = "exited by itself"
    for step, send, wait_s in (
        ("SIGINT to the server", lambda: os.kill(sid, signal.SIGINT), grace_s),
        ("SIGINT to the process group", lambda: os.killpg(sid, signal.SIGINT), 15.0),
        ("SIGTERM to the process group", lambda: os.killpg(sid, signal.SIGTERM), 15.0),
        ("SIGKILL to the process group", lambda: os.killpg(sid, signal.SIGKILL), 15.0),
    ):
        if proc.poll() is not None:
            break
        how = step
        with contextlib.suppress(ProcessLookupError):
            send()
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            print(f"  [pid {sid}] still running {wait_s:.0f}s after {step}", flush=True)
    deadline = time.monotonic() + 20
    while session_pids(sid) and time.monotonic() < deadline:  # Ray's daemons exit after the driver
        time.sleep(0.5)
    for pid in session_pids(sid):  # still there: they are ours (our session), so end them
        print(f"  [pid {sid}] killing leftover pid {pid}", flush=True)
        how += " (+ leftovers killed)"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return how


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def component(pid: int) -> str:
    """Ray's process title (``ray::ProxyActor``, ``ray::ServeReplica:...``), else the module or name."""
    try:
        process = psutil.Process(pid)
        argv, name = process.cmdline(), process.name()
    except psutil.Error:
        return "?"
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return name


def replica_pids(sid: int) -> list[int]:
    """The Serve replica processes of the server's session ``sid``."""
    return [pid for pid in session_pids(sid) if component(pid).startswith("ray::ServeReplica")]


def cpu_snapshot(sid: int | None, edge_pids: set[int] = frozenset()) -> dict[str, float]:
    """CPU seconds so far by component: the server's session, the edge's HAProxy (``edge_pids``)
    and this process (the client)."""
    totals: dict[str, float] = {"client (loadgen)": cpu_s(os.getpid())}
    for pid in session_pids(sid) if sid else []:
        name = component(pid)
        totals[name] = totals.get(name, 0.0) + cpu_s(pid)
    for pid in edge_pids:
        totals["edge haproxy"] = totals.get("edge haproxy", 0.0) + cpu_s(pid)
    return totals
