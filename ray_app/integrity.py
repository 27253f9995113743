"""The serving side of version integrity: every backend asks this before it loads or serves a version.

A version is checked against its manifest (``ray_app.manifest``) with the replica's
``AppConfig.integrity``. A pass is remembered with the version's file listing (names, sizes,
modification times, inodes): while that listing is unchanged the version is not hashed again; any
change, and every refused version, is checked in full on the next look, so a repaired version is
picked up and one swapped after its check is not served from the old answer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray_app import manifest, model_store
from ray_app.config import IntegrityOptions

logger = logging.getLogger("ray.serve")

REFUSED_REASON = "IntegrityError"  # the metrics' load-failure reason for a refused version
REFUSED_CODE = "DATA_LOSS"  # the tensorflow::error::Code a refused version reports in model status


class VersionVerifier:
    """Checks versions of one model store; blocking (file reads): call it off the event loop."""

    def __init__(self, options: IntegrityOptions, base_path: str) -> None:
        self._options = options
        self._base_path = base_path
        self._keys = [manifest.load_public_key(os.path.expanduser(path)) for path in options.trusted_keys]
        self._verified: dict[int, tuple] = {}  # version -> its listing when it passed

    def check(self, version: int) -> None:
        """Return when ``version`` may be loaded; raise ``manifest.IntegrityError`` saying why not."""
        path: Path = model_store.version_path(self._base_path, version)
        if self._options.require_manifest and not path.is_dir():
            raise manifest.IntegrityError(
                f"{path} is not visible to this replica, so it cannot be checked (mount the server's store)"
            )
        listing = _listing(path)
        if self._verified.get(version) == listing:
            return
        self._verified.pop(version, None)
        verified = manifest.verify_version(
            path, require_manifest=self._options.require_manifest, trusted_keys=self._keys
        )
        if not verified:
            logger.warning(
                "version %d has no manifest; loading it unverified (require_manifest off)", version
            )
        self._verified[version] = listing

    def refusals(self, versions: list[int]) -> dict[int, str]:
        """Of ``versions``, the ones that must not be served, with why."""
        refused = {}
        for version in versions:
            try:
                self.check(version)
            except (manifest.IntegrityError, OSError) as exc:
                refused[version] = f"{REFUSED_REASON}: {exc}"
        return refused


def _listing(path: Path) -> tuple:
    """Every entry under ``path`` with what a rewrite changes (size, mtime, inode), without reading it."""
    entries = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            info = os.lstat(os.path.join(root, name))
            entries.append((root, name, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(sorted(entries))
