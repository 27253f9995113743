"""The in-flight byte budget of one replica: request bytes held at once, HTTP and gRPC together.

Each request reserves its size before its body is read or its message parsed (HTTP: the declared
``Content-Length``, or ``max_request_bytes`` when a chunked body declares none; gRPC: the message
length) and returns it when answered. A request that does not fit is refused at once with
RESOURCE_EXHAUSTED (HTTP 429) and ``Retry-After``: a client retries later, the replica's memory
stays bounded by the budget times what a byte may cost to parse (docs/limits.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ray_app.protocol.status import ResourceExhaustedError

LIMIT_NAME = "max_inflight_bytes"


class ByteBudget:
    """Bytes reserved by requests in flight, at most ``max_bytes`` (single event loop: no lock)."""

    def __init__(self, max_bytes: int, retry_after_s: int = 1) -> None:
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s
        self.in_use = 0

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Reserve ``size`` bytes for the ``with`` block; RESOURCE_EXHAUSTED when they do not fit."""
        size = max(0, int(size))
        if size and self.in_use + size > self.max_bytes:
            raise ResourceExhaustedError(
                f"this replica holds {self.in_use} bytes of requests in flight; {size} more would pass "
                f"{LIMIT_NAME} ({self.max_bytes}): retry later",
                LIMIT_NAME,
                retry_after_s=self.retry_after_s,
            )
        self.in_use += size
        try:
            yield
        finally:
            self.in_use -= size
