"""The replica's dynamic batcher: requests gathered into backend calls, counted in images.

Ray Serve's ``@serve.batch`` queues :class:`BatchItem` s (one per request, already checked and
decoded); a batch is split by (version, signature, inputs, output filter) so different models never
share a backend call. A lone request, or one that fills a batch by itself, runs at once. Deadlines
are kept: an item whose caller stopped waiting is dropped before the model runs, and the backend
call gets at most the longest remaining wait. Transport-free, and knows nothing of requests'
names or protocols (``ray_app.predictor`` builds the items).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from ray_app.backends.base import Backend
from ray_app.metrics import AppMetrics
from ray_app.protocol.status import DeadlineExceededError, NotFoundError

Outputs = dict[str, np.ndarray]
Outcome = Outputs | Exception  # one item's answer, or the error it gets


@dataclass
class BatchItem:
    version: int
    pinned: bool  # the client named the version: it is never moved to another one
    signature: str
    inputs: dict[str, np.ndarray]
    output_filter: tuple[str, ...]
    size: int = field(default=1)  # images
    queued_s: float = field(default_factory=time.monotonic)
    deadline_s: float | None = None  # time.monotonic() after which nobody waits for the answer

    def group_key(self) -> tuple:
        """Items that may share one backend call: same version, signature, output filter, and
        inputs that concatenate (same names, dtypes and shapes past the batch dimension)."""
        inputs = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.inputs.items()))
        return self.version, self.signature, inputs, self.output_filter


def batch_images(items: list[BatchItem]) -> int:
    """A batch's size for ``max_batch_size``: its images, not its requests."""
    return sum(item.size for item in items)


def _merge(n: int, parts: list[tuple[list[int], list[Outcome]]]) -> list[Outcome]:
    """Outcomes of sub-groups (their item indices, their outcomes) back in the items' order."""
    results: list[Outcome] = [{} for _ in range(n)]
    for indices, outcomes in parts:
        for index, value in zip(indices, outcomes):
            results[index] = value
    return results


class Batcher:
    """One per replica process: Ray Serve keeps a single batch queue per decorated method."""

    def __init__(self, backend: Backend, backend_timeout_s: float, metrics: AppMetrics | None = None) -> None:
        self.backend = backend
        self.backend_timeout_s = backend_timeout_s
        self.max_batch_size = 32
        self._metrics = metrics
        self._in_flight = 0  # items between here and their answer from the backend

    def set_limits(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = max_batch_size
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def run(self, item: BatchItem) -> Outputs:
        """``item``'s outputs (its version may have moved to the latest); its error raised."""
        # Waiting for a batch gains nothing when the request fills one by itself, or when nothing
        # else is in flight (the backend is idle: a lone request runs at once, no batch wait);
        # while requests are in flight, new ones gather into batches.
        alone = self._in_flight == 0
        self._in_flight += 1
        try:
            if item.size >= self.max_batch_size or item.size == 0 or alone:
                result = (await self.run_group([item]))[0]
            else:
                result = await self._batched(item)
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def _batched(self, item: BatchItem) -> Outcome:
        """``_run_batch(item)``; alone when the batch size was lowered below the item's size while it
        was queued (Serve then fails it with a RuntimeError, which would reach the client as INTERNAL)."""
        try:
            return await self._run_batch(item)
        except RuntimeError as exc:
            if item.size > self.max_batch_size and "greater than max_batch_size" in str(exc):
                return (await self.run_group([item]))[0]
            raise

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=batch_images)
    async def _run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        self._follow_latest(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.group_key()].append(index)
        if len(groups) == 1:  # the usual case: no gather, no extra tasks
            return await self.run_group(items)
        indices = list(groups.values())
        outcomes = await asyncio.gather(*(self.run_group([items[i] for i in group]) for group in indices))
        return _merge(len(items), list(zip(indices, outcomes)))

    def _follow_latest(self, items: list[BatchItem]) -> None:
        """Unpinned items whose version was unloaded while they waited go to the latest instead."""
        loaded = self.backend.versions()
        for item in items:
            if item.version not in loaded and not item.pinned and loaded:
                item.version = loaded[-1]

    async def _without_expired(self, items: list[BatchItem], expired: list[int]) -> list[Outcome]:
        """DEADLINE_EXCEEDED for the expired items (counted); the others run without them."""
        if self._metrics is not None:
            self._metrics.expired(len(expired))
        error = DeadlineExceededError("the request's deadline passed before the model ran")
        results: list[Outcome] = [error for _ in items]
        live = [i for i in range(len(items)) if i not in set(expired)]
        if live:
            for index, value in zip(live, await self.run_group([items[i] for i in live])):
                results[index] = value
        return results

    async def run_group(self, items: list[BatchItem]) -> list[Outcome]:
        """One backend call for items sharing version, signature and inputs; split the outputs."""
        self._follow_latest(items)
        first = items[0]
        if any(item.version != first.version for item in items):
            # A version was unloaded after _run_batch grouped these: some unpinned items moved to
            # the latest, pinned ones stay (and get NOT_FOUND). Never answer one with another's.
            same = [i for i, item in enumerate(items) if item.version == first.version]
            other = [i for i, item in enumerate(items) if item.version != first.version]
            parts = await asyncio.gather(
                self.run_group([items[i] for i in same]), self.run_group([items[i] for i in other])
            )
            return _merge(len(items), [(same, parts[0]), (other, parts[1])])
        if first.version not in self.backend.versions():
            error = NotFoundError(f"version {first.version} was unloaded before the request ran")
            return [error for _ in items]
        now_s = time.monotonic()
        expired = [
            i for i, item in enumerate(items) if item.deadline_s is not None and item.deadline_s <= now_s
        ]
        if expired:
            return await self._without_expired(items, expired)
        deadlines = [item.deadline_s for item in items]
        timeout_s = self.backend_timeout_s
        if None not in deadlines:  # the longest-waiting caller still gets its answer
            timeout_s = min(timeout_s, max(deadlines) - now_s)  # type: ignore[type-var]
        total = sum(item.size for item in items)
        started_s = time.monotonic()
        try:
            inputs = {
                name: np.concatenate([item.inputs[name] for item in items])
                if len(items) > 1
                else first.inputs[name]
                for name in first.inputs
            }
            outputs = await self.backend.predict(
                first.version, first.signature, inputs, first.output_filter, timeout_s=timeout_s
            )
        except Exception as exc:  # every caller of this group gets the same error
            return [exc for _ in items]
        if self._metrics is not None:
            latency_ms = (time.monotonic() - started_s) * 1000
            self._metrics.backend_call(first.version, first.signature, self.backend.kind, total, latency_ms)
            self._metrics.batch_wait((started_s - min(item.queued_s for item in items)) * 1000)
        bounds = np.cumsum([item.size for item in items])[:-1]
        split = {
            name: np.split(value, bounds) if value.ndim and value.shape[0] == total else [value] * len(items)
            for name, value in outputs.items()
        }
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(items))]
