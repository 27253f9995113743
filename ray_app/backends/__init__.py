"""Where the model runs, behind the batcher: embedded, a TF Serving sidecar, or a remote TF Serving."""

from __future__ import annotations

import logging
import shutil

from ray_app.backends.base import Backend
from ray_app.config import AppConfig

logger = logging.getLogger("ray.serve")


def resolve_kind(config: AppConfig) -> str:
    """``auto`` means the real TF Serving binary when it is on PATH, else in-process TensorFlow."""
    if config.backend != "auto":
        return config.backend
    found = shutil.which(config.tfserving.binary)
    kind = "tfserving" if found else "embedded"
    logger.info("backend auto -> %s (%s)", kind, found or f"{config.tfserving.binary} not on PATH")
    return kind


def make_backend(config: AppConfig) -> Backend:
    """Build (not start) the backend the config asks for."""
    kind = resolve_kind(config)
    if kind == "embedded":
        from ray_app.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(config)
    if kind == "remote":
        from ray_app.backends.remote import RemoteBackend

        return RemoteBackend(config, address=config.remote_address or "")
    from ray_app.backends.tfserving import TFServingBackend

    return TFServingBackend(config)
