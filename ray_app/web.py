"""The web page at ``/`` and its one JSON endpoint (app-specific, outside TF Serving's API).

- ``GET /``: ``static/index.html``, with the app's base path and model name filled in, so the page
  works under any route prefix and front door.
- ``GET /static/{name}``: the page's CSS and JavaScript, shipped in the package (no build step,
  nothing from a CDN). Only files that exist in ``ray_app/static/`` with a known type are served,
  looked up by exact name (no path is ever built from the request). Responses carry an ETag and
  ``Cache-Control: no-cache`` (revalidate each time, 304 when unchanged), ``nosniff`` and, for the
  page, a Content-Security-Policy that allows only this origin.
- ``GET /api/models/{name}``: the versions loaded, each with its labels, its share of unpinned
  traffic and the published ``metrics.json`` figures (:data:`PANEL_METRICS`), plus the labels and
  canary share. The page polls it to show versions as they roll out.

Predictions go through the public REST API (``/v1/models/{name}:predict``), like any client.
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

from starlette.responses import Response

from ray_app.model_store import ModelStoreError, read_metrics
from ray_app.predictor import Predictor

logger = logging.getLogger("ray.serve")

INDEX_FILE = "index.html"
# Suffix -> Content-Type of what the page ships; files of any other type are not served.
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page needs nothing from elsewhere: scripts, styles and requests stay on this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)
# metrics.json fields shown on the page (the file also holds server paths, which stay private).
PANEL_METRICS = (
    "test_accuracy",
    "test_examples",
    "epochs",
    "workers",
    "batch_size_per_worker",
    "train_examples",
    "train_wall_s",
    "created_at",
    "architecture",
    "git_commit",
)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@functools.cache
def _assets() -> dict[str, _Asset]:
    """Every servable file in ``ray_app/static/`` by name (read once per process)."""
    found: dict[str, _Asset] = {}
    for entry in (resources.files("ray_app") / "static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            found[entry.name] = _Asset(body, CONTENT_TYPES[suffix], _etag(body))
    return found


def _cached(asset: _Asset, if_none_match: str | None, extra: dict[str, str] | None = None) -> Response:
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        **(extra or {}),
    }
    if if_none_match and asset.etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def static_response(name: str, if_none_match: str | None = None) -> Response:
    """One of the page's files, or 404 for any other name."""
    asset = _assets().get(name)
    if asset is None or name == INDEX_FILE:
        return Response(b"not found", status_code=404, media_type="text/plain; charset=utf-8")
    return _cached(asset, if_none_match)


def page_response(root_path: str, model_name: str, if_none_match: str | None = None) -> Response:
    """The page, for an app mounted at ``root_path`` ("" at the root) serving ``model_name``."""
    template = Template(_assets()[INDEX_FILE].body.decode())
    body = template.substitute(
        base_href=html.escape(root_path.rstrip("/") + "/"), model_name=html.escape(model_name)
    ).encode()
    page = _Asset(body, CONTENT_TYPES[".html"], _etag(body))
    return _cached(page, if_none_match, {"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@functools.lru_cache(maxsize=256)
def _panel_metrics(base_path: str, version: int) -> tuple[tuple[str, Any], ...]:
    """The shown metrics of one version (published versions never change, so this is cached)."""
    metrics = read_metrics(base_path, version)
    return tuple((key, metrics[key]) for key in PANEL_METRICS if key in metrics)


def _traffic(predictor: Predictor, loaded: list[int]) -> dict[int, float]:
    """Share of unpinned requests per version, in percent (the predictor's routing rule)."""
    labels = predictor.live.version_labels
    default = labels["stable"] if labels.get("stable") in loaded else loaded[-1]
    canary = labels.get("canary")
    share = predictor.live.canary_traffic_percent
    if canary in loaded and share > 0 and canary != default:
        return {canary: share, default: 100.0 - share}
    return {default: 100.0}


def models_summary(predictor: Predictor, model_name: str) -> dict[str, Any]:
    """What the page's panel shows: versions with metrics, labels, traffic shares (NOT_FOUND if unknown)."""
    predictor.check_model(model_name)
    loaded = predictor.backend.versions()
    labels = dict(predictor.live.version_labels)
    traffic = _traffic(predictor, loaded) if loaded else {}
    base_path = predictor.config.model_base_path
    versions = []
    for version in loaded:
        try:
            metrics: dict[str, Any] | None = dict(_panel_metrics(base_path, version))
        except ModelStoreError as exc:
            logger.warning("metrics of version %d unreadable: %s", version, exc)
            metrics = None
        versions.append(
            {
                "version": version,
                "labels": sorted(label for label, pinned in labels.items() if pinned == version),
                "traffic_percent": traffic.get(version, 0.0),
                "metrics": metrics,
            }
        )
    return {
        "model": model_name,
        "versions": versions,
        "latest": loaded[-1] if loaded else None,
        "version_labels": labels,
        "canary_traffic_percent": predictor.live.canary_traffic_percent,
    }
