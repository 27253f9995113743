"""pyproject.toml: metadata in the current setuptools form, what a built wheel ships, and that the
base install is a light client."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_and_the_build_backend_understands_it() -> None:
    # A TOML table (``{text = ...}``) makes setuptools >= 77 print a deprecation warning on every install.
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, setuptools  # PEP 639 support
    classifiers = PYPROJECT["project"].get("classifiers", [])
    assert not [c for c in classifiers if c.startswith("License ::")]  # refused next to an SPDX license


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, from a copy of its sources (no build isolation, no deps)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    (built,) = tmp_path.glob("mnist_ray-*.whl")
    return built


def test_a_built_wheel_ships_the_web_page(wheel) -> None:
    """A non-editable install serves the page too: ``ray_app/static/`` is package data."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = {f"ray_app/static/{p.name}" for p in (REPO / "ray_app" / "static").iterdir()}
        assert shipped and shipped <= names
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


BASE = {"numpy", "grpcio", "protobuf", "pillow"}


@pytest.mark.slow
def test_the_base_install_runs_the_client_without_tensorflow_or_ray(wheel, tmp_path) -> None:
    """The base install is the client: a fresh virtualenv with ``pip install <wheel>`` (no extras)
    gets numpy, grpcio, protobuf and pillow, no TensorFlow and no Ray, and its ``mnist-client``
    classifies an image against a TF Serving-protocol server (test_client.py's stand-in, here)."""
    from tests.unit.test_client import Behaviour, _start_grpc

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
