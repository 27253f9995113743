"""Per-epoch training figures as Prometheus gauges, beside what ``ray.train.report`` records.

Rank 0 sets them after each epoch (``training/loop.py``); Ray exports them from the worker's node
like every other Ray metric (prefix ``ray_``), so the Grafana dashboard
(serve_configs/grafana/mnist-serving.json) plots a run next to the serving figures. Tag: ``run``
(the Ray Train run name).

Ray 2.60 drops a gauge from its metrics endpoint about two report intervals (20 s by default)
after it was last set, and an epoch can take longer: a thread sets the last epoch's values again
every ``REFRESH_S`` while the worker lives, so the panel shows a run as a line, not as blips.

| metric | what |
|---|---|
| ``mnist_train_loss`` | mean training loss of the last epoch |
| ``mnist_train_accuracy`` | training accuracy of the last epoch |
| ``mnist_train_test_accuracy`` | accuracy on the MNIST test images after the last epoch |
| ``mnist_train_images_per_second`` | training throughput of the last epoch, all workers |
| ``mnist_train_epoch`` | the last finished epoch |
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from ray.util.metrics import Gauge

REFRESH_S = 5.0  # under Ray's default report interval (10 s), so a gauge never ages out

_FIGURES = {
    "mnist_train_loss": ("loss", "Mean training loss of the last epoch"),
    "mnist_train_accuracy": ("accuracy", "Training accuracy of the last epoch"),
    "mnist_train_test_accuracy": ("test_accuracy", "Test accuracy after the last epoch"),
    "mnist_train_images_per_second": ("images_per_s", "Training images per second in the last epoch"),
    "mnist_train_epoch": ("epoch", "The last finished epoch"),
}


class EpochGauges:
    """The gauges of one training run (created in the worker that reports)."""

    def __init__(self, run: str, refresh_s: float = REFRESH_S) -> None:
        self._tags = {"run": run}
        self._gauges = {
            key: Gauge(name, description, tag_keys=("run",)) for name, (key, description) in _FIGURES.items()
        }
        self._refresh_s = refresh_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._refresher: threading.Thread | None = None

    def report(self, metrics: Mapping[str, float]) -> None:
        """Set each gauge from an epoch's metrics (the dict given to ``ray.train.report``)."""
        with self._lock:
            self._last = {key: float(metrics[key]) for key in self._gauges if key in metrics}
        self._set_last()
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh, name="epoch-gauges", daemon=True)
            self._refresher.start()

    def close(self) -> None:
        """Stop setting the gauges again (Ray then drops them: the run is over)."""
        self._stopped.set()

    def _set_last(self) -> None:
        with self._lock:
            last = dict(self._last)
        for key, value in last.items():
            self._gauges[key].set(value, tags=self._tags)

    def _refresh(self) -> None:
        while not self._stopped.wait(self._refresh_s):
            self._set_last()
