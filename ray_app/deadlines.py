"""When a request's caller stops waiting: its deadline, read once at the door and carried inward.

HTTP: Serve's own ``x-request-timeout-seconds`` header (Serve applies it to the replica's request
timeout too), else the configured ``request_timeout_s``. gRPC: the client's deadline where the
context exposes it (``time_remaining()``: Ray 2.60's ``RayServegRPCContext`` copies the call's
metadata but not its deadline), the same ``x-request-timeout-seconds`` in the call's metadata, else
``request_timeout_s``. The smallest wins. The result is a ``time.monotonic()`` instant, which the
predictor checks before the model runs and turns into the backend call's timeout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

TIMEOUT_HEADER = "x-request-timeout-seconds"


def _seconds(text: str | None) -> float | None:
    """A positive, finite number of seconds, or None (absent, malformed, or not positive)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def deadline_s(default_s: float, *stated_s: float | None, now_s: float | None = None) -> float:
    """``now + min(default_s, every stated timeout)``."""
    now_s = time.monotonic() if now_s is None else now_s
    return now_s + min([default_s, *(s for s in stated_s if s is not None)])


def http_deadline_s(headers: Mapping[str, str], default_s: float) -> float:
    """The deadline of an HTTP request (see the module docstring)."""
    return deadline_s(default_s, _seconds(headers.get(TIMEOUT_HEADER)))


def grpc_deadline_s(grpc_context: Any, default_s: float) -> float:
    """The deadline of a gRPC call (see the module docstring)."""
    remaining = None
    time_remaining = getattr(grpc_context, "time_remaining", None)
    if callable(time_remaining):
        value = time_remaining()
        remaining = max(0.0, float(value)) if value is not None else None
    metadata: Iterable[tuple[str, Any]] = ()
    if hasattr(grpc_context, "invocation_metadata"):
        metadata = grpc_context.invocation_metadata() or ()
    stated = next((_seconds(str(value)) for key, value in metadata if key == TIMEOUT_HEADER), None)
    return deadline_s(default_s, remaining, stated)
