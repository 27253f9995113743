"""The whole journey on one machine, with the real Ray tools (the README's first command).

    python client/pipeline.py            # ~9 min on 2 cores; --help for the knobs

1. ``ray get-auth-token --generate`` (creates ``~/.ray/auth_token`` only when no token exists),
   then ``ray start --head``: a local Ray cluster, dashboard on 127.0.0.1 only, token auth on.
2. ``ray job submit ... python training/train.py``: Ray Train (2 workers) publishes version 1.
3. ``serve deploy serve_configs/local.yaml``: the app answers TF Serving's gRPC and REST APIs.
4. ``python client/grpc_client.py``: reads the sample digits in ``data/``.
5. A second ``ray job submit`` fine-tunes from the latest version and publishes version 2 while
   the app serves; a prober keeps asking all along and counts failed requests.
6. The client again, until version 2 answers.
7. Clean-up: ``serve shutdown`` and ``ray stop`` (``--keep-running`` leaves both up).

Every step is the command a user would type; their output goes to ``<run dir>/logs/`` and the
important lines are echoed. The run ends with a summary. Exit code 0 means every step worked and
every sample digit was read correctly by both versions; 1 means a step failed (the message
says which and where its log is); 2 means a bad command line or a Ray cluster already running
here (this script starts and stops its own); 130 means interrupted (Ctrl-C), after clean-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from client.local import leftovers
from client.local.ports import free_port, port_in_use
from ray_app.front_door import HAPROXY_SWITCH, front_door_env, node_cpus

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "serve_configs" / "local.yaml"
SAMPLES_DIR = REPO / "data"
SAMPLE_LABELS = SAMPLES_DIR / "samples.json"
MODEL_NAME = "mnist"
DASHBOARD_PORT = 8265
# HAProxy mode's other fixed ports (Ray's defaults), moved only when something else holds them.
_HAPROXY_DEFAULT_PORTS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 18000,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 19000,
}
_RAY_DEFAULT_PORTS = {
    "--port": 6379,
    "--dashboard-agent-listen-port": 52365,
    "--ray-client-server-port": 10001,
}
# Lines of `ray job submit`'s output worth showing (the rest goes to the log file).
_ECHO_MARKERS = ("Published version", "NOT PUBLISHED", "Job '", "Training finished")


class StepFailed(Exception):
    """A step of the journey failed; the message says which and where its log is."""


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: Path
    num_workers: int = 2
    epochs_v1: int = 3
    epochs_v2: int = 1
    smoke_test: bool = False
    grpc_port: int = 9000
    http_port: int = 8000
    step_timeout_s: float = 1800.0
    keep_running: bool = False

    @property
    def store(self) -> Path:
        return self.run_dir / "models" / MODEL_NAME

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"


@dataclass
class Report:
    """What the summary prints."""

    started: float = field(default_factory=time.monotonic)
    dashboard: str = ""
    versions: dict[int, dict] = field(default_factory=dict)  # version -> metrics.json
    answers: dict[int, list[dict]] = field(default_factory=dict)  # version -> client predictions
    probe: dict[str, object] = field(default_factory=dict)


def _say(message: str) -> None:
    print(message, flush=True)


def running_ray_processes() -> list[str]:
    """``name (pid)`` of Ray head processes (gcs_server, raylet) of any local cluster."""
    return leftovers.describe(leftovers.ray_head_processes())


class Journey:
    """Runs the steps; owns the cluster it starts."""

    kill_grace_s = 10.0  # after SIGTERM to a step that outlived its limit, SIGKILL follows
    leftover_grace_s = 30.0  # after clean-up, how long the run's processes get to exit by themselves

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.report = Report()
        self.env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        self.env.update(
            # `python` in job entrypoints and `ray`/`serve` resolve to this environment
            PATH=bin_dir + os.pathsep + self.env.get("PATH", ""),
            RAY_AUTH_MODE="token",  # new clusters require the token; the CLIs then send it
            RAY_USAGE_STATS_ENABLED="0",
            MODEL_NAME=MODEL_NAME,
            MODEL_BASE_PATH=str(config.store.parent),  # the app serves $MODEL_BASE_PATH/$MODEL_NAME
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        self.env.pop("RAY_ADDRESS", None)
        self.dashboard_port = DASHBOARD_PORT if not port_in_use(DASHBOARD_PORT) else free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.started_ray = False
        self.deployed = False
        self.haproxy_state_dir: str | None = None  # this run's HAProxy config and sockets
        self.cluster_pids: set[int] = set()  # Ray's head processes this run started

    def set_front_door(self) -> dict[str, str]:
        """The front door's environment for ``ray start`` (ray_app.front_door), with this run's
        own HAProxy state directory; Ray's fixed ports for HAProxy's stats and metrics and the
        fallback proxy move to free ones only where something else holds them."""
        self.haproxy_state_dir = leftovers.new_state_dir()
        front_door = front_door_env(node_cpus(), state_dir=self.haproxy_state_dir)
        if front_door.get(HAPROXY_SWITCH) == "1":
            for variable, default in _HAPROXY_DEFAULT_PORTS.items():
                port = int(front_door.get(variable, default))
                if port_in_use(port):
                    front_door[variable] = str(free_port())
        self.env.update(front_door)
        return front_door

    # -- running commands ---------------------------------------------------------------------
    def _run(
        self, step: str, argv: Sequence[str], timeout_s: float, echo: bool = False, keep_stdout: bool = True
    ) -> str:
        """Run one command, its output into logs/<step>.log; StepFailed if it fails or times out.

        ``keep_stdout=False`` discards stdout (shown as ``>/dev/null``) and logs only stderr.
        """
        self.config.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.config.logs / f"{step}.log"
        _say(f"    $ {shlex.join(self._display(argv))}" + ("" if keep_stdout else " >/dev/null"))
        lines: list[str] = []
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if keep_stdout else subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            timed_out = threading.Event()

            def on_timeout() -> None:
                timed_out.set()
                self._kill(process, self.kill_grace_s)

            timer = threading.Timer(timeout_s, on_timeout)
            timer.start()
            try:
                echoed: set[str] = set()
                for line in process.stdout if keep_stdout else process.stderr:
                    log.write(line)
                    lines.append(line)
                    shown = _worth_echoing(line) if echo else None
                    if shown and shown[0] not in echoed:
                        echoed.add(shown[0])
                        _say("      " + shown[1])
                code = process.wait()
            except BaseException:
                self._kill(process, self.kill_grace_s)
                raise
            finally:
                timer.cancel()
        if code != 0:
            tail = "".join(lines[-25:])
            why = f"timed out after {timeout_s:g} s" if timed_out.is_set() else f"failed (exit {code})"
            raise StepFailed(f"{step} {why}; last lines of {log_path}:\n{tail}")
        return "".join(lines)

    @staticmethod
    def _kill(process: subprocess.Popen, grace_s: float) -> None:
        """SIGTERM to the command's process group, SIGKILL if it is still there after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    @staticmethod
    def _display(argv: Sequence[str]) -> list[str]:
        """The command as the user would type it (paths relative to the repo where possible)."""
        shown = []
        for arg in argv:
            if arg == sys.executable:
                arg = "python"
            elif os.path.dirname(arg) == os.path.dirname(sys.executable):
                arg = os.path.basename(arg)
            elif arg == str(REPO) or arg.startswith(str(REPO) + os.sep):
                arg = os.path.relpath(arg, REPO)
            shown.append(arg)
        return shown

    def _tool(self, name: str) -> str:
        path = Path(sys.executable).parent / name
        return str(path) if path.exists() else name

    # -- the steps ----------------------------------------------------------------------------
    def ensure_token(self) -> None:
        """Token auth needs a token before ``ray start``: Ray's own command creates one if none exists.

        ``ray get-auth-token --generate`` never overwrites a token; it prints the token, which is
        a secret, so its stdout goes nowhere (neither the console nor the log).
        """
        existing = existing_token_source(self.env)
        self._run("1-auth-token", [self._tool("ray"), "get-auth-token", "--generate"], 60, keep_stdout=False)
        if existing:
            _say(f"      using the existing Ray token ({existing})")
        else:
            _say(f"      created a Ray token at {default_token_path(self.env)} (none existed)")

    def start_ray(self) -> None:
        front_door = self.set_front_door()
        door = "HAProxy + direct ingress" if front_door.get(HAPROXY_SWITCH) == "1" else "Serve's Python proxy"
        _say(
            f"==> [1/7] Starting a local Ray cluster (dashboard {self.dashboard}, token auth, front door: {door})"
        )
        self.ensure_token()
        argv = [
            self._tool("ray"),
            "start",
            "--head",
            "--dashboard-host",
            "127.0.0.1",
            "--disable-usage-stats",
        ]
        if self.dashboard_port != DASHBOARD_PORT:
            argv += ["--dashboard-port", str(self.dashboard_port)]
        # Ray's other fixed default ports: take a free one only where the default is taken.
        for flag, default in _RAY_DEFAULT_PORTS.items():
            if port_in_use(default):
                argv += [flag, str(free_port())]
        self.started_ray = True  # before: a half-started cluster must be stopped too
        try:
            self._run("1-ray-start", argv, timeout_s=180)
        finally:  # none ran before (run() checks), so every head process now is this run's
            self.cluster_pids = {p.pid for p in leftovers.ray_head_processes()}
        self.report.dashboard = self.dashboard

    def train(self, step: str, title: str, epochs: int, init_from_latest: bool) -> int:
        _say(title)
        before = set(_versions(self.config.store))
        # With the app's replica on the node, the workers share what is left of the CPUs.
        cpus = node_cpus()
        cpus_per_worker = max(0.25, min(1.0, (cpus - _replica_cpus()) / self.config.num_workers))
        argv = [
            self._tool("ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "training/train.py",
            "--model_path",
            str(self.config.store),
            "--epochs",
            str(epochs),
            "--num-workers",
            str(self.config.num_workers),
            "--cpus-per-worker",
            f"{cpus_per_worker:g}",
            "--storage-path",
            str(self.config.run_dir / "ray_results"),
        ]
        if init_from_latest:
            argv += ["--init-from", "latest"]
        if self.config.smoke_test:
            argv.append("--smoke-test")
        self._run(step, argv, timeout_s=self.config.step_timeout_s, echo=True)
        new = sorted(set(_versions(self.config.store)) - before)
        if len(new) != 1:
            raise StepFailed(f"{step}: expected one new version in {self.config.store}, found {new}")
        version = new[0]
        metrics_path = self.config.store / str(version) / "assets.extra" / "metrics.json"
        self.report.versions[version] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        return version

    def deploy(self) -> None:
        config_path = self._serve_config()
        _say(
            f"==> [3/7] Deploying the Serve app (gRPC :{self.config.grpc_port}, HTTP :{self.config.http_port})"
        )
        self._run(
            "3-serve-deploy",
            [self._tool("serve"), "deploy", str(config_path), "--address", self.dashboard],
            120,
        )
        self.deployed = True
        _say(f"    $ serve status --address {self.dashboard}    (every 2 s until the app is RUNNING)")
        deadline = time.monotonic() + 300
        while True:
            status = self._serve_status()
            app = (status.get("applications") or {}).get(MODEL_NAME, {})
            state = app.get("status")
            if state == "RUNNING":
                _say("    app 'mnist' is RUNNING")
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise StepFailed(f"serve deploy: app is {state}: {app.get('message', '')}")
            if time.monotonic() > deadline:
                raise StepFailed(f"serve deploy: app not RUNNING after 300 s (status {state})")
            time.sleep(2)

    def _serve_config(self) -> Path:
        """local.yaml itself, or a copy with other ports when the default ones are not wanted."""
        raw = _local_config()
        if (self.config.grpc_port, self.config.http_port) == default_ports():
            return SERVE_CONFIG
        raw["grpc_options"]["port"] = self.config.grpc_port
        raw["http_options"]["port"] = self.config.http_port
        path = self.config.run_dir / "serve_config.yaml"
        path.write_text(
            f"# serve_configs/local.yaml with gRPC on {self.config.grpc_port}, HTTP on {self.config.http_port}\n"
            + yaml.safe_dump(raw, sort_keys=False)
        )
        return path

    def _serve_status(self) -> dict:
        try:
            result = subprocess.run(
                [self._tool("serve"), "status", "--address", self.dashboard],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            return {}
        if result.returncode != 0:
            return {}
        with contextlib.suppress(yaml.YAMLError):
            return yaml.safe_load(result.stdout) or {}
        return {}

    def ask(self, step: str, title: str, expect_version: int, wait_s: float = 0.0) -> None:
        """The README's client command on one image, then on every sample with labels."""
        _say(title)
        deadline = time.monotonic() + wait_s
        single = [
            sys.executable,
            "client/grpc_client.py",
            "--image",
            "data/0.png",
            "--model",
            MODEL_NAME,
            "--host",
            "localhost",
            "--port",
            str(self.config.grpc_port),
        ]
        every = [
            sys.executable,
            "client/grpc_client.py",
            "--image",
            "data",
            "--labels",
            "data/samples.json",
            "--model",
            MODEL_NAME,
            "--port",
            str(self.config.grpc_port),
            "--json",
        ]
        while True:
            document = json.loads(self._run(step, every, timeout_s=120))
            answered = {p["version"] for p in document["predictions"]}
            if answered == {expect_version}:
                break
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"{step}: expected version {expect_version} to answer, got {sorted(answered)}"
                )
            time.sleep(1)
        for line in self._run(step + "-single", single, timeout_s=120).splitlines():
            _say("      " + line)
        digits = " ".join(str(p["digit"]) for p in document["predictions"])
        _say(
            f"      all samples (version {expect_version}): {digits}  ->  {document.get('correct', 0)}/{document.get('checked', 0)} correct"
        )
        self.report.answers[expect_version] = document["predictions"]

    def shutdown(self) -> None:
        if self.config.keep_running:
            _say(
                f"==> [7/7] Leaving Ray and the app running: dashboard {self.dashboard}; "
                f"stop with `serve shutdown -y --address {self.dashboard}` and `ray stop`"
            )
            return
        _say("==> [7/7] Cleaning up: serve shutdown, ray stop")
        ours = self._cluster_processes()  # before they go: Ray's workers (replicas, haproxy's parent) too
        if self.deployed:
            with contextlib.suppress(StepFailed, OSError):
                self._run(
                    "7-serve-shutdown",
                    [self._tool("serve"), "shutdown", "-y", "--address", self.dashboard],
                    120,
                )
        if self.started_ray:
            with contextlib.suppress(StepFailed, OSError):
                self._run("7-ray-stop", [self._tool("ray"), "stop"], 120)
        self.check_nothing_left(ours)

    def _cluster_processes(self) -> list[psutil.Process]:
        processes = []
        for pid in self.cluster_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                head = psutil.Process(pid)
                processes += [head, *head.children(recursive=True)]
        return processes

    def check_nothing_left(self, ours: list[psutil.Process]) -> None:
        """After clean-up: none of this run's processes (Ray, replicas, HAProxy) alive, serving ports free.

        Anything still there after a grace period is stopped (SIGTERM, then SIGKILL) and reported.
        """
        state_dir = self.haproxy_state_dir

        def alive(process: psutil.Process) -> bool:
            try:
                return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:  # exited between the two calls
                return False

        def still_running() -> list[psutil.Process]:
            return [p for p in ours if alive(p)] + (
                leftovers.haproxy_processes(state_dir) if state_dir else []
            )

        left = leftovers.wait_gone(still_running, timeout_s=self.leftover_grace_s)
        if left:
            _say(f"      warning: stopping what clean-up left running: {', '.join(leftovers.describe(left))}")
            leftovers.stop(left)
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        ports = [self.config.grpc_port, self.config.http_port]
        busy = [port for port in ports if port_in_use(port)]
        if busy:
            _say(f"      warning: ports {busy} are still in use")
        elif self.started_ray:
            _say(
                f"    nothing left running: no Ray, replica or HAProxy process of this run; "
                f"ports {', '.join(map(str, ports))} free"
            )


class Prober:
    """Asks for one sample digit every ``interval_s`` in a thread; counts answers by version."""

    def __init__(self, port: int, interval_s: float = 0.2) -> None:
        from client.images import read_image_bytes, to_mnist_tensor
        from client.messages import ModelTarget, images_batch
        from client.transport import GrpcTransport

        path = SAMPLES_DIR / "0.png"
        self._batch = images_batch([to_mnist_tensor(path, read_image_bytes(path))])
        self._target = ModelTarget(MODEL_NAME)
        self._transport = GrpcTransport("localhost", port, timeout_s=10)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.versions: dict[int, int] = {}
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def _loop(self) -> None:
        from client.errors import ClientError

        while not self._stop.is_set():
            try:
                version = self._transport.predict(self._target, self._batch).version
                self.versions[version] = self.versions.get(version, 0) + 1
            except ClientError as exc:
                self.failures.append(str(exc))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._transport.close()


def default_token_path(env: dict[str, str]) -> Path:
    """Where ``ray get-auth-token --generate`` writes a new token: ``~/.ray/auth_token``."""
    return Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"


def existing_token_source(env: dict[str, str]) -> str | None:
    """Where Ray would find a token (the places its token loader looks, in its order), or None."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    custom = env.get("RAY_AUTH_TOKEN_PATH")
    if custom:
        with contextlib.suppress(OSError):
            if Path(custom).read_text().strip():
                return f"RAY_AUTH_TOKEN_PATH={custom}"
    default = default_token_path(env)
    with contextlib.suppress(OSError):
        if default.read_text().strip():
            return str(default)
    return None


def _local_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def default_ports() -> tuple[int, int]:
    """(gRPC, HTTP) ports of serve_configs/local.yaml."""
    raw = _local_config()
    return int(raw["grpc_options"]["port"]), int(raw["http_options"]["port"])


def _replica_cpus() -> float:
    """CPUs the app's replicas reserve (serve_configs/local.yaml)."""
    deployments = _local_config()["applications"][0]["deployments"]
    return sum(
        float(d.get("ray_actor_options", {}).get("num_cpus", 1)) * int(d.get("num_replicas", 1))
        for d in deployments
    )


def _versions(store: Path) -> list[int]:
    if not store.is_dir():
        return []
    return sorted(int(p.name) for p in store.iterdir() if p.name.isdigit() and p.is_dir())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]")
_EPOCH = re.compile(r"^\[rank \d+\] epoch (\d+)/\d+:")
_RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s*")  # "(RayTrainWorker pid=123) "
_RAY_CLI_PREFIX = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+\w+ \S+ -- "
)  # "<time> SUCC cli.py:67 -- "


def _worth_echoing(line: str) -> tuple[str, str] | None:
    """(dedup key, text) of a line to show, without Ray's colours and prefixes; None to skip it.

    One line per epoch: training prints ``epoch N/M: ...`` once per epoch from its driver
    (older versions printed ``[rank R] epoch N/M: ...`` from every worker, folded by Ray's log
    deduplication and marked ``[repeated Nx across cluster]``); ``warning:`` and ``error:``
    lines and the markers of the steps' outcomes are shown too.
    """
    text = _RAY_CLI_PREFIX.sub("", _RAY_PREFIX.sub("", _ANSI.sub("", line.strip())))
    text = _REPEATED.sub("", text)
    epoch = _EPOCH.search(text) or re.match(r"epoch (\d+)/\d+:", text)
    if epoch:
        return f"epoch {epoch.group(1)}", text
    if text.startswith(("error:", "warning:")) or any(marker in text for marker in _ECHO_MARKERS):
        return text, text
    return None


def _shown_path(path: Path) -> str:
    """Relative to the repository when inside it (as the commands are shown), else absolute."""
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)


def summary(journey: Journey, ok: bool) -> str:
    report, config = journey.report, journey.config
    minutes, seconds = divmod(int(time.monotonic() - report.started), 60)
    rows: list[tuple[str, str]] = [
        ("dashboard", (report.dashboard or "-") + ("" if config.keep_running else " (stopped)")),
        (
            "model store",
            f"{_shown_path(config.store)}: versions {', '.join(map(str, report.versions)) or 'none'}",
        ),
    ]
    for version, metrics in report.versions.items():
        accuracy = metrics.get("test_accuracy")
        shown = f"{accuracy * 100:.2f} %" if isinstance(accuracy, float) else "?"
        rows.append(
            (
                f"version {version}",
                f"test accuracy {shown} on {metrics.get('test_examples', '?')} images, "
                f"{metrics.get('epochs', '?')} epoch(s), {metrics.get('workers', '?')} Ray Train workers, "
                f"{metrics.get('train_wall_s', '?')} s",
            )
        )
    for version, predictions in report.answers.items():
        right = sum(bool(p.get("correct")) for p in predictions)
        digits = " ".join(str(p["digit"]) for p in predictions)
        rows.append((f"answers v{version}", f"{digits}  ({right}/{len(predictions)} sample digits correct)"))
    if report.probe:
        rows.append(
            (
                "while retraining",
                f"{report.probe['requests']} requests, {report.probe['failed']} failed, "
                f"answered by versions {report.probe['versions']}",
            )
        )
    rows += [("logs", _shown_path(config.logs)), ("took", f"{minutes} min {seconds:02d} s")]
    lines = ["", "Summary" + ("" if ok else " (FAILED)")]
    lines += [f"  {key:<17} {value}" for key, value in rows]
    return "\n".join(lines)


def run(config: PipelineConfig) -> int:
    others = running_ray_processes()
    if others:
        print(
            f"error: a Ray cluster is already running on this machine ({', '.join(others[:4])}); this "
            "script starts and stops its own. Stop the other one first (`ray stop`).",
            file=sys.stderr,
        )
        return 2
    for port in (config.grpc_port, config.http_port):
        if port_in_use(port):
            print(f"error: port {port} is in use; pass --grpc-port/--http-port", file=sys.stderr)
            return 2
    journey = Journey(config)
    ok = interrupted = False
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # `kill`/CI timeouts clean up like Ctrl-C
    _say(f"Run directory: {config.run_dir}")
    try:
        journey.start_ray()
        v1 = journey.train(
            "2-train-v1",
            f"==> [2/7] Training version 1 with Ray Train ({config.num_workers} workers)",
            config.epochs_v1,
            init_from_latest=False,
        )
        journey.deploy()
        journey.ask("4-client-v1", f"==> [4/7] Asking the app (gRPC :{config.grpc_port})", expect_version=v1)
        with Prober(config.grpc_port) as prober:
            v2 = journey.train(
                "5-train-v2",
                "==> [5/7] Training version 2 (fine-tuned from the latest) while serving",
                config.epochs_v2,
                init_from_latest=True,
            )
            journey.ask(
                "6-client-v2", f"==> [6/7] Waiting for version {v2} to answer", expect_version=v2, wait_s=120
            )
        journey.report.probe = {
            "requests": sum(prober.versions.values()) + len(prober.failures),
            "failed": len(prober.failures),
            "versions": ", ".join(f"{v} ({n}x)" for v, n in sorted(prober.versions.items())) or "none",
        }
        if prober.failures:
            raise StepFailed(
                f"{len(prober.failures)} requests failed while version 2 was published: {prober.failures[0]}"
            )
        wrong = [
            p["image"]
            for answers in journey.report.answers.values()
            for p in answers
            if "expected" in p and not p["correct"]
        ]
        if wrong:
            raise StepFailed(f"sample digits read wrongly: {', '.join(wrong)}")
        ok = True
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("error: interrupted; cleaning up", file=sys.stderr, flush=True)
        interrupted = True
    except Exception as exc:  # anything unplanned: one line, clean-up still runs
        print(f"error: {type(exc).__name__}: {exc} (logs: {config.logs})", file=sys.stderr, flush=True)
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip it
        try:
            journey.shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_sigterm)
        _say(summary(journey, ok))
    return 0 if ok else (130 if interrupted else 1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None = None) -> PipelineConfig:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__.split("\n\n")[0])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=REPO / "runs" / f"pipeline-{stamp}",
        help="model store, Ray Train results and logs of this run (default: runs/pipeline-<time>)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default: 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for version 1 (default: 3)")
    parser.add_argument(
        "--epochs-v2", type=int, default=1, help="fine-tuning epochs for version 2 (default: 1)"
    )
    parser.add_argument("--smoke-test", action="store_true", help="train on 30,000 images (tests)")
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--step-timeout-s", type=float, default=1800.0, help="limit of each training run")
    parser.add_argument(
        "--keep-running", action="store_true", help="leave Ray and the app running at the end"
    )
    args = parser.parse_args(argv)
    if args.num_workers < 1 or args.epochs < 1 or args.epochs_v2 < 1:
        parser.error("--num-workers, --epochs and --epochs-v2 must be >= 1")
    if args.run_dir.exists() and any(args.run_dir.iterdir()):
        parser.error(f"--run-dir {args.run_dir} is not empty (each run publishes versions 1 and 2 afresh)")
    return PipelineConfig(
        run_dir=args.run_dir.resolve(),
        num_workers=args.num_workers,
        epochs_v1=args.epochs,
        epochs_v2=args.epochs_v2,
        smoke_test=args.smoke_test,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        step_timeout_s=args.step_timeout_s,
        keep_running=args.keep_running,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    if not __package__:
        sys.path.insert(0, str(REPO))  # run as a script: make the repo root importable
    sys.exit(main())
