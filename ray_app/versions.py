"""Which loaded version answers a request: a pinned number or label, else the canary share, the
``stable`` label or the latest; and TF Serving's NOT_FOUND / INVALID_ARGUMENT texts when none can.

Reads what the backend has loaded and the live settings (labels, canary share) at each call, so a
newly published version or a ``serve deploy`` of new labels applies to the next request.
"""

from __future__ import annotations

import random

from ray_app.backends.base import Backend, VersionState
from ray_app.config import LiveConfig
from ray_app.metrics import AppMetrics
from ray_app.protocol.status import InvalidArgumentError, NotFoundError


def servable_not_found(name: str, version: int | None) -> str:
    """TF Serving's NOT_FOUND text (``ServableRequest::DebugString``)."""
    request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
    return f"Servable not found for request: {request}"


class VersionRouter:
    """Version routing for the one model a replica serves."""

    def __init__(
        self,
        model_name: str,
        backend: Backend,
        rng: random.Random | None = None,
        metrics: AppMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.backend = backend
        self.live = LiveConfig()
        self._rng = rng or random.Random()
        self._metrics = metrics

    def check_model(self, name: str, version: int | None = None) -> None:
        """TF Serving's answers for a missing or unknown model name."""
        if not name:
            raise InvalidArgumentError("ModelSpec has no name specified.")
        if name != self.model_name:
            raise NotFoundError(servable_not_found(name, version))

    def resolve(self, version: int | None, label: str | None) -> tuple[int, bool]:
        """(version to run, whether the client pinned it), following labels and the canary share."""
        loaded = self.backend.versions()
        labels = self.live.version_labels
        if label:
            if label not in labels:
                raise InvalidArgumentError(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is not None:  # 0 too: TF Serving serves a 0/ directory as version 0
            if version not in loaded:
                raise NotFoundError(servable_not_found(self.model_name, version))
            return version, True
        if not loaded:
            raise NotFoundError(f"{servable_not_found(self.model_name, None)} ({self._nothing_loaded()})")
        canary_share = self.live.canary_traffic_percent
        if canary_share > 0 and labels.get("canary") in loaded and self._rng.random() * 100 < canary_share:
            return self._routed(labels["canary"], "canary"), False
        if labels.get("stable") in loaded:
            return self._routed(labels["stable"], "stable"), False
        return self._routed(loaded[-1], "latest"), False

    def _routed(self, version: int, route: str) -> int:
        if self._metrics is not None:
            self._metrics.routed(version, route)
        return version

    def _nothing_loaded(self) -> str:
        if any(state.error for state in self.backend.version_states().values()):
            return "no version could be loaded; the model status says why"
        return "no version is loaded yet; waiting for the first one to be published"

    def status(self, model_name: str, version: int | None) -> dict[int, VersionState]:
        """TF Serving's GetModelStatus: one version's state, or every version's, newest first.

        Labels are ignored, as TF Serving does. NOT_FOUND with its texts when nothing matches.
        """
        states = self.backend.version_states() if model_name == self.model_name else {}
        if version is not None:
            if version not in states:
                raise NotFoundError(f"Could not find version {version} of model {model_name}")
            return {version: states[version]}
        if not states:
            raise NotFoundError(f"Could not find any versions of model {model_name}")
        return dict(sorted(states.items(), reverse=True))
