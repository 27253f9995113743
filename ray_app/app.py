"""Application builder for Serve configs: ``import_path: ray_app.app:build_app``."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from ray_app.config import AppConfig


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the ``args:`` block (plus ``MODEL_NAME``/``MODEL_BASE_PATH``) and bind the app."""
    from ray_app.deployment import MnistServer

    config = AppConfig.model_validate(args or {}).with_env_overrides()
    return MnistServer.bind(config.model_dump())
