"""The ``tfserving`` (sidecar) and ``remote`` backends against the TF Serving stand-in.

``ray_app`` launches ``tensorflow_model_server`` from PATH exactly as in production; here
PATH leads to the stand-in (tests/fake_tfserving), which speaks the real protocol. Where the real
binary is on PATH, the main scenario runs against it too (skipped elsewhere, saying so).
"""

import asyncio
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

from client.local.ports import free_port
from ray_app.backends import make_backend, resolve_kind
from ray_app.backends.remote import RemoteBackend
from ray_app.backends.tfserving import TFServingBackend
from ray_app.config import AppConfig, TFServingOptions
from ray_app.protocol.status import InvalidArgumentError, NotFoundError, UnavailableError
from tests.conftest import publish_copy, tamper_with_weights
from tests.fake_tfserving import install_fake_tfserving
from tests.polling import wait_for_async
from training.data import load_mnist

IMAGES = load_mnist().test.images[:8]
LABELS = load_mnist().test.labels[:8]
REAL_BINARY = shutil.which("tensorflow_model_server")  # before any test puts the stand-in on PATH


@pytest.fixture
def fake_binary_on_path(tmp_path, monkeypatch):
    _stand_in_on_path(tmp_path, monkeypatch)


def _stand_in_on_path(tmp_path, monkeypatch) -> None:
    install_fake_tfserving(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(params=["stand-in", "real"])
def a_binary_on_path(request, tmp_path, monkeypatch):
    """The stand-in on PATH, or the real ``tensorflow_model_server`` where one is installed."""
    if request.param == "real":
        if REAL_BINARY is None:
            pytest.skip("tensorflow_model_server is not on PATH (install TF Serving to run this against it)")
        return
    _stand_in_on_path(tmp_path, monkeypatch)


def _config(store, **kwargs) -> AppConfig:
    return AppConfig(
        model_base_path=str(store),
        poll_interval_s=0.3,
        tfserving=TFServingOptions(startup_timeout_s=60),
        **kwargs,
    )


def test_auto_picks_tfserving_when_the_binary_is_on_path(store, fake_binary_on_path):
    assert resolve_kind(_config(store)) == "tfserving"
    assert isinstance(make_backend(_config(store)), TFServingBackend)


def test_auto_falls_back_to_embedded(store, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_kind(_config(store)) == "embedded"


def test_sidecar_serves_reloads_restarts_and_stops(store, trained_export, a_binary_on_path):
    async def scenario():
        backend = TFServingBackend(_config(store))
        await backend.start()
        try:
            assert backend.versions() == [1]
            assert {"serving_default", "predict_images"} <= set(backend.signatures(1))
            outputs = await backend.predict(1, "serving_default", {"images": IMAGES}, ())
            assert np.mean(outputs["classes"] == LABELS) >= 0.75
            with pytest.raises(InvalidArgumentError):
                await backend.predict(1, "serving_default", {"images": IMAGES.astype(np.float32)}, ())
            with pytest.raises(NotFoundError):
                await backend.predict(5, "serving_default", {"images": IMAGES}, ())

            publish_copy(trained_export, store, 2)  # checked, then named in the child's policy
            await wait_for_async(lambda: backend.versions() == [1, 2], 30, "backend.versions() == [1, 2]")

            first_pid = backend.pid
            os.kill(first_pid, signal.SIGKILL)
            await wait_for_async(
                lambda: backend.pid != first_pid and backend.versions() == [1, 2],
                60,
                "backend.pid != first_pid and backend.versions() == [1, 2]",
            )
            assert backend.health_problem() is None
            outputs = await backend.predict(2, "serving_default", {"images": IMAGES}, ())
            assert outputs["classes"].shape == (8,)
        finally:
            child = backend.pid
            await backend.stop()
        assert subprocess.run(["kill", "-0", str(child)], capture_output=True).returncode != 0

    asyncio.run(scenario())


def test_sidecar_keeps_a_labelled_old_version_loaded(store, trained_export, fake_binary_on_path):
    for version in (2, 3):
        publish_copy(trained_export, store, version)

    async def scenario():
        backend = TFServingBackend(_config(store, num_versions=1))
        await backend.start()
        try:
            await wait_for_async(lambda: backend.versions() == [3], 30, "backend.versions() == [3]")
            backend.set_pinned_versions([1])
            await wait_for_async(lambda: backend.versions() == [1, 3], 30, "backend.versions() == [1, 3]")
            backend.set_pinned_versions([])  # labels removed: back to the latest-N policy
            await wait_for_async(lambda: backend.versions() == [3], 30, "backend.versions() == [3]")
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_remote_backend_forwards_to_a_running_tf_serving(store, tmp_path):
    binary = install_fake_tfserving(tmp_path / "bin")
    port = free_port()
    process = subprocess.Popen(
        [str(binary), f"--port={port}", "--model_name=mnist", f"--model_base_path={store}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def scenario():
            backend = RemoteBackend(
                _config(store, backend="remote", remote_address=f"127.0.0.1:{port}"),
                address=f"127.0.0.1:{port}",
            )
            await backend.start()
            try:
                for _ in range(300):  # the server loads the model before it answers
                    await backend.refresh()
                    if backend.versions() == [1]:
                        break
                    await asyncio.sleep(0.2)
                assert backend.versions() == [1], backend.health_problem()
                outputs = await backend.predict(
                    1, "predict_images", {"images": IMAGES.reshape(8, 784).astype(np.float32) / 255.0}, ()
                )
                assert np.mean(np.argmax(outputs["scores"], 1) == LABELS) >= 0.75
            finally:
                await backend.stop()

        asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(10)


def test_missing_binary_is_a_clear_error(store, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = TFServingBackend(_config(store, backend="tfserving"))
    with pytest.raises(Exception, match="not on PATH"):
        asyncio.run(backend.start())


def test_sidecar_listens_on_a_private_unix_socket_only(store, fake_binary_on_path):
    import psutil

    async def scenario():
        backend = TFServingBackend(_config(store))
        await backend.start()
        try:
            child = psutil.Process(backend.pid)
            listening = [c for c in child.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            sockets = [c.laddr for c in child.net_connections(kind="unix") if c.laddr]
            command = child.cmdline()
            workdir = backend._workdir
            return listening, sockets, command, oct(workdir.stat().st_mode & 0o777), workdir
        finally:
            await backend.stop()

    listening, sockets, command, mode, workdir = asyncio.run(scenario())
    assert listening == []  # nothing on the network can reach its Predict or reload API
    assert str(workdir / "tfserving.sock") in sockets and "--port=0" in command
    assert mode == "0o700"  # only the replica's user can open the socket
    assert not workdir.exists()  # removed on stop


def test_a_failed_start_leaves_no_child_and_no_work_directory(store, tmp_path, monkeypatch):
    """A binary that never answers: start() fails after its start-up limit and cleans up."""
    binary = tmp_path / "bin" / "tensorflow_model_server"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexec sleep 60\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    backend = TFServingBackend(
        AppConfig(model_base_path=str(store), tfserving=TFServingOptions(startup_timeout_s=1))
    )
    with pytest.raises(UnavailableError, match="did not answer within 1"):
        asyncio.run(backend.start())
    assert backend._process is not None and backend._process.poll() is not None  # stopped and reaped
    assert not backend._workdir.exists()


def test_sidecar_starts_before_the_first_version_and_serves_it_when_published(
    tmp_path, trained_export, fake_binary_on_path
):
    store = tmp_path / "empty" / "mnist"

    async def scenario():
        backend = TFServingBackend(_config(store))
        await backend.start()  # must not wait for (or fail without) a version: no crash loop
        try:
            assert backend.versions() == [] and backend.health_problem() is None
            publish_copy(trained_export, store, 1)
            await wait_for_async(lambda: backend.versions() == [1], 60, "backend.versions() == [1]")
            outputs = await backend.predict(1, "serving_default", {"images": IMAGES}, ())
            assert outputs["classes"].shape == (8,)
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_sidecar_keeps_supervising_when_a_listing_or_a_reload_fails(
    store, trained_export, fake_binary_on_path, monkeypatch
):
    """A store listing that raises and reload RPCs that fail are retried on the next round."""
    import grpc

    from ray_app import model_store

    publish_copy(trained_export, store, 2)
    real_list = model_store.list_versions
    failures = {"list": 2, "reload": 2}

    def flaky_list(path):
        if failures["list"]:
            failures["list"] -= 1
            raise OSError("NFS hiccup")
        return real_list(path)

    monkeypatch.setattr(model_store, "list_versions", flaky_list)

    async def scenario():
        backend = TFServingBackend(_config(store, num_versions=1))
        await backend.start()
        real_reload = backend._reload

        async def flaky_reload(request, timeout):
            if failures["reload"]:
                failures["reload"] -= 1
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "connection reset")
            return await real_reload(request, timeout=timeout)

        backend._reload = flaky_reload
        try:
            await wait_for_async(lambda: backend.versions() == [2], 30, "backend.versions() == [2]")
            backend.set_pinned_versions([1])
            await wait_for_async(lambda: backend.versions() == [1, 2], 60, "backend.versions() == [1, 2]")
            assert failures == {"list": 0, "reload": 0}  # both failed first, and supervision went on
        finally:
            await backend.stop()

    asyncio.run(scenario())


async def _child_versions(backend: RemoteBackend) -> set[int]:
    """The versions the TF Serving process itself holds (asked directly, not through our filter)."""
    from ray_app.protocol.protos import get_model_status_pb2, model_pb2

    request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="mnist"))
    status = await backend._status(request, timeout=10)
    return {s.version for s in status.model_version_status}


def test_sidecar_never_loads_a_version_altered_after_publishing(store, trained_export, fake_binary_on_path):
    tamper_with_weights(publish_copy(trained_export, store, 2))

    async def scenario():
        backend = TFServingBackend(_config(store, num_versions=1))
        await backend.start()
        try:
            await asyncio.sleep(1.5)  # several polls and policy updates
            state = backend.version_states()[2]
            return backend.versions(), state, await _child_versions(backend)
        finally:
            await backend.stop()

    versions, state, child_versions = asyncio.run(scenario())
    assert versions == [1] and child_versions == {1}  # the child never even loaded it
    assert (
        state.state == "END" and state.error_code == "DATA_LOSS" and state.error.startswith("IntegrityError")
    )


def test_remote_backend_never_routes_to_a_version_altered_after_publishing(store, trained_export, tmp_path):
    tamper_with_weights(publish_copy(trained_export, store, 2))
    binary = install_fake_tfserving(tmp_path / "bin")
    port = free_port()
    process = subprocess.Popen(
        [str(binary), f"--port={port}", "--model_name=mnist", f"--model_base_path={store}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def scenario():
            config = _config(store, backend="remote", remote_address=f"127.0.0.1:{port}")
            backend = RemoteBackend(config, address=f"127.0.0.1:{port}")
            await backend.start()
            try:
                for _ in range(300):  # the server (policy: latest 1) loads version 2: it trusts its store
                    if await backend.refresh() and await _child_versions(backend) == {2}:
                        break
                    await asyncio.sleep(0.2)
                await backend.refresh()  # a status read after both are loaded
                with pytest.raises(NotFoundError):
                    await backend.predict(2, "serving_default", {"images": IMAGES}, ())
                return backend.versions(), backend.version_states()
            finally:
                await backend.stop()

        versions, states = asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(10)
    assert versions == [], states  # the remote server's own policy holds only version 2: nothing to serve
    state = states[2]
    assert state.error_code == "DATA_LOSS" and state.error.startswith("IntegrityError")
