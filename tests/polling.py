"""The one way tests wait for something to become true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


def wait_for(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
    ignore: tuple[type[BaseException], ...] = (),
) -> float:
    """Poll ``condition`` until it is true; the seconds that took. Fails the test after ``timeout_s``.
    ``ignore``: exceptions that count as "not yet" (a server still starting)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if condition():
                return time.monotonic() - started
        except ignore:
            pass
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def wait_for_async(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1
) -> float:
    """:func:`wait_for` inside a running event loop (the loop keeps running while it waits)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
