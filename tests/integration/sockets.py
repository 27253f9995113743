"""What a set of processes listens on, and who else may reach a unix socket (docs/security.md)."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Iterable
from pathlib import Path

import psutil


def writable_by_other_users(path: Path) -> bool:
    """Whether a user other than the owner (and not in its group) can connect to / write ``path``:
    the file needs o+w and every directory above it o+x."""
    if not path.lstat().st_mode & stat.S_IWOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def listening(processes: Iterable[psutil.Process]) -> tuple[set[tuple[str, int]], set[Path]]:
    """The TCP addresses ``(ip, port)`` and the unix socket paths that ``processes`` listen on."""
    inet: set[tuple[str, int]] = set()
    unix: set[Path] = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    inet.add((connection.laddr.ip, connection.laddr.port))
            for connection in process.net_connections(kind="unix"):
                if connection.laddr and connection.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):
                    unix.add(Path(connection.laddr))
    return inet, unix
