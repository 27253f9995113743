"""The app's own metrics, exported through Ray's Prometheus endpoint on every node.

Made with ``ray.serve.metrics`` (Serve adds ``deployment``, ``replica`` and ``application`` tags;
Ray prefixes every name with ``ray_`` on export). docs/reference/metrics.md documents each one with its
TF Serving counterpart; ``serve_configs/grafana/mnist-serving.json`` is a dashboard over them.

| metric | type | tags | what |
|---|---|---|---|
| ``mnist_requests_total`` | counter | model, version, signature, protocol, method, code | requests answered, by status code (version ``""`` when none was resolved) |
| ``mnist_request_latency_ms`` | histogram | model, version, signature, protocol, method | time inside the replica, request in to answer out |
| ``mnist_images_total`` | counter | model, version, signature | images (examples) answered |
| ``mnist_backend_latency_ms`` | histogram | model, version, signature, backend | one backend call (a batch): TF in-process, or the TF Serving RPC |
| ``mnist_batch_size_images`` | histogram | model, version, signature | images per backend call |
| ``mnist_batch_wait_ms`` | histogram | model | how long the oldest request of a batch waited for it to run |
| ``mnist_versions_loaded`` | gauge | model, version, state | 1 per version and state (AVAILABLE, LOADING, END) |
| ``mnist_version_load_failures_total`` | counter | model, version, reason | failed loads (reason: the error's type) |
| ``mnist_version_load_seconds`` | histogram | model, version | time to load a version and replay its warmup |
| ``mnist_requests_rejected_total`` | counter | model, limit | requests refused by one of ``Limits`` (RESOURCE_EXHAUSTED) |
| ``mnist_routed_requests_total`` | counter | model, version, route | requests without a pinned version, by where they went: canary, stable, latest |
| ``mnist_canary_traffic_percent`` | gauge | model | the configured canary share (compare with the routed counter's actual share) |
| ``mnist_auth_refusals_total`` | counter | model, protocol, reason | requests refused by token auth (reason: missing, malformed, wrong) |

Ray 2.60 exports a gauge's value after it is set and its metrics agent drops the value about two
report intervals (``RAY_metrics_report_interval_ms``, 10 s by default) after the last export: a
gauge set once disappears from Prometheus. So the replica sets both gauges again on every health
check (``health_check_period_s``, 5 s in our configs), not only when they change
(``bench/dashboard_check.py`` found the canary gauge gone seconds after a deploy).

Ray 2.60's metrics agent also rebuilds each histogram's ``_sum`` from bucket midpoints (its
``record_histogram_aggregated_batch``): ``_count`` and the buckets are exact, a mean from ``_sum``
is only as fine as the buckets. Exact means come from counters (images answered over backend calls).
"""

from __future__ import annotations

import time
from collections import Counter as Tally

from ray.serve.metrics import Counter, Gauge, Histogram

# Counters are summed here and handed to Ray at most this often (and on flush()): one Ray call per
# tag set and second instead of several per request, which the replica's profile showed.
FLUSH_INTERVAL_S = 1.0

_LATENCY_MS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000]
_BATCH_IMAGES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024]
_LOAD_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_STATES = ("AVAILABLE", "LOADING", "END")


class AppMetrics:
    """One per replica. Counters are summed locally and flushed at most every ``FLUSH_INTERVAL_S``
    (call :meth:`flush` periodically too, so the last counts reach Ray when traffic stops)."""

    def __init__(self, model_name: str) -> None:
        self.model = model_name
        self._requests = Counter(
            "mnist_requests_total",
            "Requests answered, by status code",
            tag_keys=("model", "version", "signature", "protocol", "method", "code"),
        )
        self._request_latency = Histogram(
            "mnist_request_latency_ms",
            "Time inside the replica from request to answer, in ms",
            boundaries=_LATENCY_MS,
            tag_keys=("model", "version", "signature", "protocol", "method"),
        )
        self._images = Counter(
            "mnist_images_total", "Images (examples) answered", tag_keys=("model", "version", "signature")
        )
        self._backend_latency = Histogram(
            "mnist_backend_latency_ms",
            "One backend call (a batch), in ms",
            boundaries=_LATENCY_MS,
            tag_keys=("model", "version", "signature", "backend"),
        )
        self._batch_size = Histogram(
            "mnist_batch_size_images",
            "Images per backend call",
            boundaries=_BATCH_IMAGES,
            tag_keys=("model", "version", "signature"),
        )
        self._batch_wait = Histogram(
            "mnist_batch_wait_ms",
            "Time a request waited for its batch, in ms",
            boundaries=_LATENCY_MS,
            tag_keys=("model",),
        )
        self._versions = Gauge(
            "mnist_versions_loaded", "1 per model version and state", tag_keys=("model", "version", "state")
        )
        self._load_failures = Counter(
            "mnist_version_load_failures_total",
            "Failed version loads, by the error's type",
            tag_keys=("model", "version", "reason"),
        )
        self._load_seconds = Histogram(
            "mnist_version_load_seconds",
            "Time to load a version and replay its warmup, in s",
            boundaries=_LOAD_S,
            tag_keys=("model", "version"),
        )
        self._rejected = Counter(
            "mnist_requests_rejected_total", "Requests refused by a limit", tag_keys=("model", "limit")
        )
        self._expired = Counter(
            "mnist_requests_expired_total",
            "Requests dropped before the model ran: their deadline had passed",
            tag_keys=("model",),
        )
        self._routed = Counter(
            "mnist_routed_requests_total",
            "Requests without a pinned version, by where they were routed",
            tag_keys=("model", "version", "route"),
        )
        self._canary_percent = Gauge(
            "mnist_canary_traffic_percent",
            "Configured share of unpinned traffic for the canary",
            tag_keys=("model",),
        )
        self._auth_refusals = Counter(
            "mnist_auth_refusals_total",
            "Requests refused by bearer-token authentication, by reason",
            tag_keys=("model", "protocol", "reason"),
        )
        self._shown_versions: dict[tuple[int, str], float] = {}
        self._tally: Tally[tuple[Counter, tuple[tuple[str, str], ...]]] = Tally()
        self._flushed_s = time.monotonic()

    def _count(self, counter: Counter, amount: int, **tags: str) -> None:
        self._tally[(counter, tuple(tags.items()))] += amount
        if time.monotonic() - self._flushed_s >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Hand the summed counts to Ray."""
        tally, self._tally = self._tally, Tally()
        self._flushed_s = time.monotonic()
        for (counter, tags), amount in tally.items():
            counter.inc(amount, tags=dict(tags))

    def request(
        self, protocol: str, method: str, code: str, latency_ms: float, version: int | None, signature: str
    ) -> None:
        tags = {
            "model": self.model,
            "version": "" if version is None else str(version),
            "signature": signature,
        }
        self._count(self._requests, 1, **tags, protocol=protocol, method=method, code=code)
        self._request_latency.observe(latency_ms, tags={**tags, "protocol": protocol, "method": method})

    def answered(self, version: int, signature: str, images: int) -> None:
        self._count(self._images, images, model=self.model, version=str(version), signature=signature)

    def backend_call(
        self, version: int, signature: str, backend: str, images: int, latency_ms: float
    ) -> None:
        tags = {"model": self.model, "version": str(version), "signature": signature}
        self._backend_latency.observe(latency_ms, tags={**tags, "backend": backend})
        self._batch_size.observe(images, tags=tags)

    def batch_wait(self, wait_ms: float) -> None:
        self._batch_wait.observe(wait_ms, tags={"model": self.model})

    def versions(self, states: dict[int, str]) -> None:
        """Set the versions gauge to the backend's current states (versions gone drop to 0)."""
        shown = {(version, state): 1.0 for version, state in states.items() if state in _STATES}
        for key in self._shown_versions.keys() - shown.keys():
            shown[key] = 0.0
        for (version, state), value in shown.items():
            self._versions.set(value, tags={"model": self.model, "version": str(version), "state": state})
        self._shown_versions = {key: value for key, value in shown.items() if value}

    def load_failed(self, version: int, reason: str) -> None:
        self._load_failures.inc(1, tags={"model": self.model, "version": str(version), "reason": reason})

    def loaded(self, version: int, seconds: float) -> None:
        self._load_seconds.observe(seconds, tags={"model": self.model, "version": str(version)})

    def rejected(self, limit: str) -> None:
        self._count(self._rejected, 1, model=self.model, limit=limit)

    def auth_refused(self, protocol: str, reason: str) -> None:
        self._count(self._auth_refusals, 1, model=self.model, protocol=protocol, reason=reason)

    def expired(self, count: int) -> None:
        self._count(self._expired, count, model=self.model)

    def routed(self, version: int, route: str) -> None:
        self._count(self._routed, 1, model=self.model, version=str(version), route=route)

    def canary_percent(self, percent: float) -> None:
        self._canary_percent.set(percent, tags={"model": self.model})
