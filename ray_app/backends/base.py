"""The backend contract and the version policy every backend shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from ray_app.signatures import SignatureSpec

# TF Serving's ModelVersionStatus.State names (get_model_status.proto).
State = Literal["START", "LOADING", "AVAILABLE", "UNLOADING", "END"]


@dataclass(frozen=True)
class VersionState:
    """What model status reports for one version (TF Serving's ModelVersionStatus)."""

    state: State
    error: str | None = None  # why it is not AVAILABLE (e.g. a failed load), None when fine
    error_code: str = "OK"  # a tensorflow::error::Code name: OK, UNKNOWN, NOT_FOUND, ...


AVAILABLE = VersionState("AVAILABLE")


class LoadObserver(Protocol):
    """Told of version loads (``ray_app.metrics.AppMetrics`` is one)."""

    def loaded(self, version: int, seconds: float) -> None: ...

    def load_failed(self, version: int, reason: str) -> None: ...


class Backend(Protocol):
    """Runs one model's versions. All methods are called on the replica's event loop."""

    kind: str

    async def start(self) -> None:
        """Load what is there now; return once the start-up state is known (possibly no version yet)."""

    async def stop(self) -> None: ...

    def versions(self) -> list[int]:
        """Versions that can answer now, ascending."""

    def version_states(self) -> dict[int, VersionState]:
        """Every version the backend knows of: AVAILABLE ones, and ones loading or failed to load."""

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]: ...

    def set_pinned_versions(self, versions: Iterable[int]) -> None:
        """Versions that must stay loaded besides the latest ones (labelled versions)."""

    async def predict(
        self,
        version: int,
        signature: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one (already validated, possibly batched) request; DEADLINE_EXCEEDED after
        ``timeout_s`` (default ``backend_timeout_s``), the time its callers have left."""

    def health_problem(self) -> str | None:
        """Why the backend cannot serve, or None when it can (or is waiting for a first version)."""


def desired_versions(available: Iterable[int], num_versions: int, pinned: Iterable[int]) -> set[int]:
    """TF Serving's ``latest {num_versions}`` policy plus the pinned (labelled) versions that exist."""
    present = sorted(set(available))
    return set(present[-num_versions:]) | (set(pinned) & set(present))
