"""The in-flight byte budget of one replica: request bytes held at once, HTTP and gRPC together.

A gRPC message reserves its length before it is parsed (it has arrived whole). An HTTP body pays
for its bytes as they arrive (:meth:`ByteBudget.metered`), so a request that declares a large
``Content-Length`` and then sends little holds only what it sent: a few slow uploads cannot take
the budget from everyone else. Its declared length is still checked first against what is free
(:meth:`ByteBudget.check_free`): a body that could not fit is refused before a byte is read. What
is held is returned when the request is answered. A request that does not fit is refused with
RESOURCE_EXHAUSTED (HTTP 429) and ``Retry-After``: a client retries later, the replica's memory
stays bounded by the budget times what a byte may cost to parse (docs/limits.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from ray_app.protocol.status import ResourceExhaustedError

LIMIT_NAME = "max_inflight_bytes"


class ByteBudget:
    """Bytes reserved by requests in flight, at most ``max_bytes`` (single event loop: no lock)."""

    def __init__(self, max_bytes: int, retry_after_s: int = 1) -> None:
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s
        self.in_use = 0

    def check_free(self, size: int) -> None:
        """RESOURCE_EXHAUSTED unless ``size`` more bytes fit now (nothing is reserved)."""
        size = max(0, int(size))
        if size and self.in_use + size > self.max_bytes:
            raise ResourceExhaustedError(
                f"this replica holds {self.in_use} bytes of requests in flight; {size} more would pass "
                f"{LIMIT_NAME} ({self.max_bytes}): retry later",
                LIMIT_NAME,
                retry_after_s=self.retry_after_s,
            )

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Reserve ``size`` bytes for the ``with`` block; RESOURCE_EXHAUSTED when they do not fit."""
        size = max(0, int(size))
        self.check_free(size)
        self.in_use += size
        try:
            yield
        finally:
            self.in_use -= size

    @contextmanager
    def metered(
        self, stream: AsyncIterator[bytes], declared_bytes: int = 0
    ) -> Iterator[AsyncIterator[bytes]]:
        """``stream`` paying for each chunk as it arrives (RESOURCE_EXHAUSTED at the first that does
        not fit); everything it paid is returned when the ``with`` block ends. Before the first
        chunk is awaited, ``declared_bytes`` (the body's ``Content-Length``) must be free: a body
        that could not fit is refused before a byte of it is read."""
        held = 0

        async def paying() -> AsyncIterator[bytes]:
            nonlocal held
            self.check_free(declared_bytes)
            async for chunk in stream:
                self.check_free(len(chunk))
                self.in_use += len(chunk)
                held += len(chunk)
                yield chunk

        try:
            yield paying()
        finally:
            self.in_use -= held
