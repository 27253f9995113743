"""CPU work on a request's content, off the replica's event loop when it is not small.

With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` our handlers share one event loop with Serve's own gRPC
and HTTP servers and health checks: a 7 MiB JSON body parsed inline stalls every other client for
the parse. Two ways off the loop, by size:

- content above ``offload_min_bytes`` (rendering, TensorProto decoding, smaller JSON bodies) runs
  on a small pool of threads. Threads share the GIL: a C call that holds it (``orjson.loads``,
  ``np.fromiter``) still excludes the loop for its own duration, but no longer for the whole
  request.
- a REST body above ``offload_process_min_bytes`` is decoded in the replica's decoding processes
  (``offload_processes``, spawned at start). Their parse holds no lock of the replica's, and they
  run at the lowest CPU priority (nice 19 and Linux's ``SCHED_IDLE``, below every nice level), so
  on a busy node small requests go first. A process that dies (a body that ran it out of memory)
  fails only its request, and is replaced.

The queue in front of both pools is bounded by the in-flight byte budget (``ray_app.budget``):
every queued item holds its request's reservation. bench/README.md measures both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ray_app.parent_death import die_with_parent
from ray_app.protocol.status import ResourceExhaustedError

T = TypeVar("T")
logger = logging.getLogger(__name__)

PROCESS_NICE = 19  # the lowest priority: a large body's decoding gives way to everything else


def _start_child(parent_pid: int) -> None:
    """A decoding process's start: it ends with the replica, even one killed with SIGKILL
    (``PR_SET_PDEATHSIG``), and runs at the lowest priority: nice 19, and ``SCHED_IDLE``, whose
    scheduler weight is a fifth of nice 19's (3 against 15; nice 15, a Ray worker's, is 36), so
    it gets CPU time mostly when nothing else wants it (measured in bench/README.md)."""
    if sys.platform.startswith("linux"):
        die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the replica ended before the line above
        os._exit(0)
    with contextlib.suppress(OSError):
        os.nice(max(0, PROCESS_NICE - os.nice(0)))
    with contextlib.suppress(OSError, AttributeError):  # Linux: below every nice level
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _call_in_child(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, then the memory its parse took handed back to the system: a large body's
    document is many times its size, and glibc would otherwise keep it for the process. An
    error goes back without its traceback, whose frames would hold the document meanwhile."""
    error: BaseException | None = None
    try:
        result = fn(*args)
    except Exception as exc:
        error = exc.with_traceback(None)
        error.__context__ = error.__cause__ = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)
    if error is not None:
        raise error
    return result


class Offloader:
    """Runs ``fn(*args)`` inline when ``size_bytes`` is small, else on its own threads, or (with
    :meth:`run_isolated`, larger still) in its own processes."""

    def __init__(self, threads: int, min_bytes: int, processes: int = 0, process_min_bytes: int = 0) -> None:
        self.min_bytes = min_bytes
        self.process_min_bytes = process_min_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="offload")
        self._processes = processes
        self._process_pool: ProcessPoolExecutor | None = None
        self.processes_replaced = 0

    async def run(self, size_bytes: int, fn: Callable[..., T], *args: Any) -> T:
        if size_bytes < self.min_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # -- processes -----------------------------------------------------------------------------
    def start(self) -> None:
        """Spawns the decoding processes now (a replica's start), not on the first large body."""
        if self._processes and self._process_pool is None:
            self._process_pool = self._new_process_pool()
            self._process_pool.submit(os.getpid)  # the pool spawns its processes on demand

    def _new_process_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a process with TF's threads
            initializer=_start_child,
            initargs=(os.getpid(),),
        )

    async def run_isolated(self, size_bytes: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a decoding process when ``size_bytes`` is at least
        ``process_min_bytes``, else as :meth:`run`. ``fn`` is a module-level function whose
        arguments, result and exceptions pickle."""
        if not self._processes or size_bytes < self.process_min_bytes:
            return await self.run(size_bytes, fn, *args)
        self.start()
        pool = self._process_pool
        assert pool is not None
        try:
            return await asyncio.wrap_future(pool.submit(_call_in_child, fn, *args))
        except BrokenProcessPool:
            if self._process_pool is pool:  # the first of its requests to see it replaces it
                self._process_pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                self.processes_replaced += 1
                logger.warning("a decoding process ended while decoding a request; replacing it")
                self.start()
            raise ResourceExhaustedError(
                "the request's content could not be decoded: the replica's decoding process ended "
                "while decoding it (out of memory?)",
                "decoding_process",
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._process_pool is not None:
            self._process_pool.shutdown(wait=False, cancel_futures=True)
            self._process_pool = None
