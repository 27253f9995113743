"""CPU work on a request's content, off the replica's event loop when it is not small.

With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` our handlers share one event loop with Serve's own gRPC
and HTTP servers and health checks: a 7 MiB JSON body parsed inline stalls every other client for
the parse. Work on content above ``offload_min_bytes`` (JSON parsing, conversion and rendering,
TensorProto decoding) runs on a small pool of threads instead; below it, the thread hop would
cost more than the work. The queue in front of the pool is bounded by the in-flight byte budget
(``ray_app.budget``): every queued item holds its request's reservation.

Threads share the GIL: a C call that holds it (``orjson.loads``, ``np.fromiter``) still excludes
the loop for its own duration, but no longer for the whole request; bench/README.md measures it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offloader:
    """Runs ``fn(*args)`` inline when ``size_bytes`` is small, else on its own threads."""

    def __init__(self, threads: int, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="offload")

    async def run(self, size_bytes: int, fn: Callable[..., T], *args: Any) -> T:
        if size_bytes < self.min_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
