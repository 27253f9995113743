"""Reading an HTTP request body within ``max_request_bytes``: JSON bodies and multipart uploads alike.

The declared ``Content-Length`` is checked before a byte is read; a body without one (chunked) is
counted while it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError


def _as_bytes(declared: str) -> int | None:
    """A ``Content-Length`` value as a number of bytes, None when it is not one (ASCII digits only:
    ``"²".isdigit()`` is True too)."""
    return int(declared) if declared.isascii() and declared.strip().isdigit() else None


def check_declared_length(headers: Mapping[str, str], max_bytes: int) -> None:
    """Refuse a body whose declared ``Content-Length`` is over the limit (or not a number)."""
    declared = headers.get("content-length")
    if declared is None:
        return
    size = _as_bytes(declared)
    if size is None:
        raise InvalidArgumentError(f"Content-Length must be a number of bytes, got {declared!r}")
    if size > max_bytes:
        raise ResourceExhaustedError(
            f"request body is {size} bytes; the limit is {max_bytes}", "max_request_bytes"
        )


def declared_bytes(headers: Mapping[str, str], max_bytes: int) -> int:
    """A body's declared ``Content-Length`` (checked first against ``max_bytes``), 0 when it
    declares none (chunked): what the in-flight budget must have free before the body is read."""
    check_declared_length(headers, max_bytes)
    return declared_or_zero(headers)


def declared_or_zero(headers: Mapping[str, str]) -> int:
    """The declared ``Content-Length`` when it is a number, else 0 (for the in-flight budget only:
    the body's reader refuses a malformed one with its own error)."""
    declared = headers.get("content-length")
    return (_as_bytes(declared) if declared is not None else None) or 0


async def limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """``stream``'s chunks, RESOURCE_EXHAUSTED as soon as they add up to more than ``max_bytes``."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise ResourceExhaustedError(
                f"request body is over the limit of {max_bytes} bytes; stopped reading"
            )
        yield chunk


async def read_body(headers: Mapping[str, str], stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body, within ``max_bytes`` (declared length first, then the bytes received)."""
    check_declared_length(headers, max_bytes)
    return b"".join([chunk async for chunk in limited(stream, max_bytes)])
