"""Sidecar backend: each replica runs its own ``tensorflow_model_server`` child and forwards to it.

The child listens only on a unix socket in the replica's private directory (``--port=0``
turns TF Serving's TCP listener off, ``--grpc_socket_path`` turns the socket on), so nothing
else on the cluster network can call it, its reload API included. It gets a
``--model_config_file`` whose policy always names specific versions: of the versions in the
store that match their manifests (``ray_app.integrity``), the latest N plus those that labels
pin. So the child never loads a version that fails the check (TF Serving would run its graph's
initialisers and warmup); a refused version is reported END with why. The replica waits until
the child answers (with or without a version: before the first version is published it simply
has none yet), restarts it if it dies, keeps supervising whatever a reload RPC or a store listing raises, and stops it
when the replica shuts down. With ``num_gpus: 1`` on the replica, each child owns one GPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from ray_app import model_store
from ray_app.backends.base import desired_versions
from ray_app.backends.remote import RemoteBackend
from ray_app.config import AppConfig
from ray_app.parent_death import parent_death_hook
from ray_app.protocol.protos import model_management_pb2, model_server_config_pb2
from ray_app.protocol.status import UnavailableError

SOCKET_NAME = "tfserving.sock"

logger = logging.getLogger("ray.serve")


def model_server_config(config: AppConfig, specific_versions: Iterable[int]):
    """The ``ModelServerConfig`` the child loads: exactly ``specific_versions`` (none: no version)."""
    model = model_server_config_pb2.ModelConfig(
        name=config.model_name,
        base_path=os.path.abspath(config.model_base_path),
        model_platform="tensorflow",
    )
    model.model_version_policy.specific.SetInParent()  # an empty list still means "specific"
    model.model_version_policy.specific.versions.extend(sorted(specific_versions))
    server_config = model_server_config_pb2.ModelServerConfig()
    server_config.model_config_list.config.append(model)
    return server_config


def build_command(config: AppConfig, binary: str, socket_path: Path, config_file: Path) -> list[str]:
    """The child's command line, in TF Serving's ``--flag=value`` syntax (no TCP listener)."""
    options = config.tfserving
    command = [
        binary,
        "--port=0",
        f"--grpc_socket_path={socket_path}",
        "--rest_api_port=0",
        f"--model_config_file={config_file}",
        f"--file_system_poll_wait_seconds={options.file_system_poll_wait_seconds}",
    ]
    if options.enable_batching:
        command.append("--enable_batching=true")
        if options.batching_parameters_file:
            command.append(f"--batching_parameters_file={options.batching_parameters_file}")
    if options.per_process_gpu_memory_fraction is not None:
        command.append(f"--per_process_gpu_memory_fraction={options.per_process_gpu_memory_fraction}")
    return command + list(options.extra_flags)


class TFServingBackend(RemoteBackend):
    kind = "tfserving"

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config, address="")
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="tfserving-"))
        self._config_file = self._workdir / "models.config"
        self._specific: list[int] = []
        self._store_refused: dict[int, str] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        try:
            await self._launch()
        except BaseException:  # no child, socket or work directory outlives a failed start
            await self.stop()
            raise
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_child())

    async def _launch(self) -> None:
        binary = shutil.which(self._config.tfserving.binary)
        if binary is None:
            raise UnavailableError(f"TF Serving binary {self._config.tfserving.binary!r} is not on PATH")
        socket_path = self._workdir / SOCKET_NAME
        socket_path.unlink(missing_ok=True)
        try:
            self._specific = await self._wanted_versions()
        except OSError:  # an unreadable store: start with no version, supervision looks again
            logger.exception("listing the model store failed; starting the child with no version")
            self._specific = []
        self._config_file.write_text(str(model_server_config(self._config, self._specific)))
        command = build_command(self._config, binary, socket_path, self._config_file)
        logger.info("starting %s", " ".join(command))
        hook = parent_death_hook(signal.SIGTERM)  # no server orphaned if the replica dies
        # fork+exec of a large replica process: off the event loop
        self._process = await asyncio.to_thread(subprocess.Popen, command, preexec_fn=hook)
        if self._channel is not None:
            await self._channel.close()
        self._connect(f"unix:{socket_path}")
        await self._wait_until_answering()

    async def _wait_until_answering(self) -> None:
        """Until the child answers GetModelStatus (a version need not be there yet)."""
        deadline = time.monotonic() + self._config.tfserving.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise UnavailableError(
                    f"tensorflow_model_server exited with code {self._process.returncode} during start-up"
                )
            if await self.refresh():
                logger.info(
                    "TF Serving child %d answering; versions %s",
                    self._process.pid,
                    self._versions or "none yet",
                )
                return
            await asyncio.sleep(0.2)
        raise UnavailableError(
            f"tensorflow_model_server did not answer within {self._config.tfserving.startup_timeout_s}s "
            f"({self.health_problem()})"
        )

    async def _watch_child(self) -> None:
        """Supervise until stopped: restart a dead child, keep labelled versions loaded, retry failures."""
        while not self._stopping:
            await asyncio.sleep(self._config.poll_interval_s)
            try:
                await self._supervise_once()
            except Exception:  # never stop supervising: the next round retries
                logger.exception("supervising the TF Serving child failed; will retry")

    async def _supervise_once(self) -> None:
        if self._stopping:
            return
        if self._process is not None and self._process.poll() is not None:
            logger.error("TF Serving child exited with code %s; restarting", self._process.returncode)
            self._versions, self._states = [], {}
            self._problem = f"TF Serving child exited with code {self._process.returncode}"
            await asyncio.sleep(self._config.tfserving.restart_backoff_s)
            await self._launch()
        else:
            await self._update_policy()

    async def _wanted_versions(self) -> list[int]:
        """The store's versions that pass the check, through the policy (latest N plus pinned)."""
        available = await asyncio.to_thread(model_store.list_versions, self._config.model_base_path)
        self._store_refused = await asyncio.to_thread(self._verifier.refusals, available)
        verified = [v for v in available if v not in self._store_refused]
        return sorted(desired_versions(verified, self._config.num_versions, self._pinned))

    async def _refusals(self, states) -> dict[int, str]:
        """Refused versions of the store (the child never sees them), from the last policy update."""
        return dict(self._store_refused)

    async def _update_policy(self) -> None:
        """Point the child at the versions it should hold (new, refused or labelled ones change it)."""
        wanted = await self._wanted_versions()
        if wanted == self._specific:
            return
        server_config = model_server_config(self._config, wanted)
        request = model_management_pb2.ReloadConfigRequest(config=server_config)
        response = await self._reload(request, timeout=self._config.backend_timeout_s)
        if response.status.error_code:
            raise RuntimeError(f"TF Serving refused the new config: {response.status.error_message}")
        # a restarted child starts from it (off the loop, like every file-system call here)
        await asyncio.to_thread(self._config_file.write_text, str(server_config))
        self._specific = wanted

    def health_problem(self) -> str | None:
        if self._process is None or self._process.poll() is not None:
            return "TF Serving child process is not running"
        return super().health_problem()

    async def stop(self) -> None:
        self._stopping = True
        if self._watch_task:
            self._watch_task.cancel()
        await super().stop()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)
