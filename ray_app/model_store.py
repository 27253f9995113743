"""The versioned model store: ``<base_path>/<version>/`` SavedModels, as TF Serving watches them.

Layout (one directory per model)::

    <base_path>/
        1/  saved_model.pb  variables/  assets.extra/{metrics.json, tf_serving_warmup_requests,
                                                     manifest.json[, manifest.json.sig]}
        2/  ...
        .staging-<random>/       # export in progress; TF Serving ignores non-integer names
        .staging-<random>.lock   # held (shared flock) by the export while it runs
        .checkpoints/<run>/      # Ray Train checkpoints of each training run (training/train.py)
        .deleting-<version>-<random>/  # a version being removed (training/retention.py)

A version is published by renaming a finished staging directory into place, under a lock,
so readers never see half a model and two publishers never get the same number. Publishing
writes the version's manifest (every file with its SHA-256, optionally signed: see
``ray_app.manifest``), which servers check before they load a version. This module
has no TensorFlow dependency so the serving side can import it cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_app import manifest

METRICS_FILE = "metrics.json"
WARMUP_FILE = "tf_serving_warmup_requests"
EXTRA_DIR = manifest.EXTRA_DIR
STAGING_PREFIX = ".staging-"
STAGING_LOCK_SUFFIX = ".lock"
DELETING_PREFIX = ".deleting-"
CHECKPOINTS_DIR = ".checkpoints"  # not an integer, so never a version
_LOCK_FILE = ".publish.lock"


class ModelStoreError(RuntimeError):
    """The model store cannot do what was asked (bad path, version exists, ...)."""


class VersionExistsError(ModelStoreError):
    """Publishing would overwrite an existing version."""


def _local(base_path: str | os.PathLike[str]) -> Path:
    text = os.fspath(base_path)
    if "://" in text and not text.startswith("file://"):
        raise ModelStoreError(
            f"model store {text!r}: only local or mounted (NFS/EFS/FUSE) paths are supported; "
            "mount the bucket and pass the mount path"
        )
    return Path(text.removeprefix("file://"))


def store_path(base_path: str | os.PathLike[str]) -> Path:
    """The store's directory (``file://`` stripped); other URIs are refused."""
    return _local(base_path)


def version_path(base_path: str | os.PathLike[str], version: int) -> Path:
    """Directory of one version."""
    return _local(base_path) / str(int(version))


def is_complete_version(path: Path) -> bool:
    """True when ``path`` holds a loadable SavedModel (graph file present)."""
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def list_versions(base_path: str | os.PathLike[str]) -> list[int]:
    """Published versions, ascending. A missing store has no versions."""
    root = _local(base_path)
    if not root.is_dir():
        return []
    versions = []
    for entry in root.iterdir():
        name = entry.name
        if name.isdigit() and entry.is_dir() and is_complete_version(entry):
            versions.append(int(name))
    return sorted(versions)


def latest_version(base_path: str | os.PathLike[str]) -> int | None:
    """Highest published version, or None for an empty store."""
    versions = list_versions(base_path)
    return versions[-1] if versions else None


def next_version(base_path: str | os.PathLike[str]) -> int:
    """The number a new version gets when none is asked for: one past the highest directory."""
    root = _local(base_path)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(taken, default=0) + 1


def read_metrics(base_path: str | os.PathLike[str], version: int) -> dict[str, Any]:
    """The ``metrics.json`` a version was published with ({} when it has none)."""
    path = version_path(base_path, version) / EXTRA_DIR / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"cannot read {path}: {exc}") from exc


@contextlib.contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    with open(root / _LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_lock_path(staged: Path) -> Path:
    """The lock file an export holds while ``staged`` is in use (beside it, never inside a version)."""
    return staged.with_name(staged.name + STAGING_LOCK_SUFFIX)


def staging_in_use(staged: Path) -> bool:
    """True while an export holds ``staged``'s lock (a killed export's lock is free: flock dies with it)."""
    try:
        handle = open(staging_lock_path(staged), "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def staging_dir(base_path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden directory beside the versions, removed afterwards unless published.

    The export holds a shared lock on ``<dir>.lock`` meanwhile, so retention never removes a
    staging directory that is still being written or scored, however long that takes.
    """
    root = _local(base_path)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    lock = staging_lock_path(path)
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)


def remove_version(base_path: str | os.PathLike[str], version: int) -> None:
    """Remove a published version: renamed out of the versions first (atomic, so a watcher sees it
    gone at once, never half deleted), then deleted."""
    root = _local(base_path)
    source = version_path(root, version)
    with _publish_lock(root):
        doomed = Path(tempfile.mkdtemp(prefix=f"{DELETING_PREFIX}{int(version)}-", dir=root))
        os.rename(source, doomed / "version")
    shutil.rmtree(doomed, ignore_errors=True)


def check_version_free(base_path: str | os.PathLike[str], version: int) -> None:
    """Fail early, before training, when ``version`` is already taken."""
    if version < 1:
        raise ModelStoreError(f"version must be a positive integer, got {version}")
    if version_path(base_path, version).exists():
        raise VersionExistsError(
            f"version {version} already exists at {version_path(base_path, version)}; "
            "versions are immutable, pick another --version or omit it"
        )


def publish(
    staged: Path, base_path: str | os.PathLike[str], version: int | None = None, signing_key: Any = None
) -> int:
    """Atomically move a finished export into place as ``version`` (default: the next one), with
    its manifest (signed when ``signing_key``, an Ed25519 private key, is given).

    Raises VersionExistsError instead of overwriting. Returns the version published.
    """
    root = _local(base_path)
    if not is_complete_version(staged):
        raise ModelStoreError(f"{staged} is not a SavedModel (no saved_model.pb)")
    manifest.write_manifest(staged, signing_key)  # last: it covers every file written before
    with _publish_lock(root):
        chosen = next_version(root) if version is None else int(version)
        check_version_free(root, chosen)
        staged.chmod(0o755)  # mkdtemp makes it 0700; serving may run as another user
        # Both paths are in the same directory, so the rename is atomic; the lock
        # keeps a concurrent publisher from taking the same number in between.
        os.rename(staged, root / str(chosen))
    return chosen
