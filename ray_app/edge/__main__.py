"""``python -m ray_app.edge``: run, reload, stop or show one node's edge (docs/edge.md).

python -m ray_app.edge run --config serve_configs/edge/cluster.yaml --pid-file /tmp/mnist-edge/edge.pid
python -m ray_app.edge reload --pid-file /tmp/mnist-edge/edge.pid   # after replacing certificates
python -m ray_app.edge stop --pid-file /tmp/mnist-edge/edge.pid
python -m ray_app.edge render --config serve_configs/edge/cluster.yaml   # the HAProxy config, printed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ray_app.edge import config as edge_config
from ray_app.edge.haproxy_config import EdgeFiles, render
from ray_app.edge.supervisor import EdgeError, EdgeProcess, ports_open, supervise


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_pid(pid_file: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        if psutil.pid_exists(pid) and "ray_app.edge" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    return None


def _run(args: argparse.Namespace) -> int:
    config = edge_config.load(args.config)
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="mnist-edge-"))
    if args.pid_file:
        running = _read_pid(args.pid_file)
        if running:
            _say(f"edge: already running (pid {running}, {args.pid_file}); stop it first")
            return 2
        args.pid_file.parent.mkdir(parents=True, exist_ok=True)
        args.pid_file.write_text(f"{os.getpid()}\n")
    try:
        return supervise(EdgeProcess(config, state_dir), log=_say)
    except EdgeError as exc:
        _say(f"edge: {exc}")
        return 1
    finally:
        if args.pid_file and _read_pid(args.pid_file) in (None, os.getpid()):
            args.pid_file.unlink(missing_ok=True)


def _start(args: argparse.Namespace) -> int:
    """``run`` in a new session, in the background; returns once its ports accept connections."""
    config = edge_config.load(args.config)
    running = _read_pid(args.pid_file)
    if running:
        _say(f"edge: already running (pid {running}, {args.pid_file})")
        return 0
    args.log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "ray_app.edge",
        "run",
        "--config",
        str(args.config),
        "--pid-file",
        str(args.pid_file),
    ]
    if args.state_dir:
        argv += ["--state-dir", str(args.state_dir)]
    with open(args.log_file, "ab") as log:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout_s
    while not (ports_open(config) and _read_pid(args.pid_file) == child.pid):
        if child.poll() is not None or time.monotonic() > deadline:
            _say(f"edge: did not start (see {args.log_file})")
            if child.poll() is None:
                child.terminate()
            return 1
        time.sleep(0.2)
    _say(f"edge: running (pid {child.pid}, log {args.log_file})")
    return 0


def _signal(args: argparse.Namespace, sig: int) -> int:
    pid = _read_pid(args.pid_file)
    if pid is None:
        _say(f"edge: not running ({args.pid_file})")
        return 0 if sig == signal.SIGTERM else 1
    os.kill(pid, sig)
    if sig != signal.SIGTERM:
        return 0
    deadline = time.monotonic() + args.timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            _say(f"edge: pid {pid} still running {args.timeout_s:g} s after SIGTERM")
            return 1
        time.sleep(0.2)
    return 0


def _render(args: argparse.Namespace) -> int:
    config = edge_config.load(args.config)
    print(render(config, EdgeFiles(args.state_dir or Path("/tmp/mnist-edge"))), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_app.edge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the edge in the foreground until SIGTERM/SIGINT (SIGHUP: reload)"
    )
    render_cmd = commands.add_parser("render", help="print the HAProxy configuration")
    for sub in (run, render_cmd):
        sub.add_argument("--config", type=Path, required=True, help="an edge YAML (serve_configs/edge/)")
        sub.add_argument(
            "--state-dir", type=Path, default=None, help="HAProxy's files (default: a new temp dir)"
        )
    run.add_argument("--pid-file", type=Path, default=None, help="where to write this supervisor's pid")
    for name, text in (
        ("reload", "re-read the config and certificates"),
        ("stop", "stop and wait until gone"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--pid-file", type=Path, required=True)
        sub.add_argument("--timeout-s", type=float, default=90.0)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "render":
        return _render(args)
    if args.command == "start":
        return _start(args)
    return _signal(args, signal.SIGHUP if args.command == "reload" else signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
