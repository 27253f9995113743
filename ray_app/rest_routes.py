"""TF Serving's REST URLs: which request a method and raw path ask for.

As ``HttpRestApiHandler::ProcessRequest`` matches them: the patterns are case-insensitive and
matched on the raw (undecoded) path plus query; anything else under ``/v1/`` is INVALID_ARGUMENT
"Malformed request".
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from ray_app.protocol.protos import model_pb2
from ray_app.protocol.status import InvalidArgumentError

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I
)
_INT64_MAX = 2**63 - 1

Kind = Literal["predict", "classify", "regress", "status", "metadata"]


@dataclass(frozen=True)
class Route:
    """What a REST request asks for, parsed from its method and raw path as TF Serving does."""

    kind: Kind
    model_name: str
    version: int | None = None
    label: str | None = None

    def model_spec(self) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label
        return spec


def route(method: str, path_and_query: str) -> Route:
    """Dispatch like ``HttpRestApiHandler::ProcessRequest``; INVALID_ARGUMENT "Malformed request" else."""
    malformed = InvalidArgumentError(f"Malformed request: {method} {path_and_query}")
    pattern = {"POST": _PREDICT_PATH, "GET": _STATUS_PATH}.get(method)
    match = pattern.fullmatch(path_and_query) if pattern else None
    if match is None:
        raise malformed
    name, version_text, label, last = match.groups()
    if method == "GET" and not name:
        raise InvalidArgumentError("Missing model name in request.")
    if method == "POST" and last not in ("predict", "classify", "regress"):
        raise malformed  # the pattern is case-insensitive, the verb comparison is not
    version = None
    if version_text is not None:
        # int() refuses over 4,300 digits (ValueError): anything over 19 is out of range anyway
        if len(version_text) > len(str(_INT64_MAX)) or int(version_text) > _INT64_MAX:
            raise InvalidArgumentError(f"Failed to convert version: {version_text[:40]} to numeric.")
        version = int(version_text)
    kind: Kind = last if method == "POST" else ("metadata" if last == "metadata" else "status")
    return Route(kind, urllib.parse.unquote(name), version, urllib.parse.unquote(label) if label else None)
