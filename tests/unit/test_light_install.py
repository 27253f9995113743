"""The base install is the client: a fresh virtualenv with ``pip install <wheel>`` (no extras) gets
numpy, grpcio, protobuf and pillow, no TensorFlow and no Ray, and its ``mnist-client`` classifies
an image against a TF Serving-protocol server (the stand-in of test_client.py, in this process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.unit.test_client import Behaviour, _start_grpc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BASE = {"numpy", "grpcio", "protobuf", "pillow"}


def _wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("ray_app", "training", "client"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mnist_ray-*.whl")
    return wheel


def test_the_base_install_runs_the_client_without_tensorflow_or_ray(tmp_path):
    wheel = _wheel(tmp_path)
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, env=environ
    )
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert BASE <= names
    assert not names & {"tensorflow", "ray", "keras", "tensorflow-serving-api", "fastapi"}, names

    behaviour = Behaviour()
    server, port = _start_grpc(behaviour)
    try:
        result = subprocess.run(
            [str(env_dir / "bin" / "mnist-client"), "--image", str(REPO / "data" / "0.png"), "--model", "mnist",
             "--host", "localhost", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,  # not the checkout: the installed package alone
            env=environ,
        )  # fmt: skip
    finally:
        server.stop(grace=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Predicted Digit:  ")
    assert "Predicted Confidence:  " in result.stdout
    (request,) = behaviour.requests
    assert request.model_spec.name == "mnist"
