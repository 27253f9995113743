"""Per-epoch training figures as Prometheus gauges, beside what ``ray.train.report`` records.

Rank 0 sets them after each epoch; Ray exports them from the worker's node like every other Ray
metric (prefix ``ray_``), so the Grafana dashboard (serve_configs/grafana/mnist-serving.json)
plots a run next to the serving figures. Tag: ``run`` (the Ray Train run name).

| metric | what |
|---|---|
| ``mnist_train_loss`` | mean training loss of the last epoch |
| ``mnist_train_accuracy`` | training accuracy of the last epoch |
| ``mnist_train_test_accuracy`` | accuracy on the MNIST test images after the last epoch |
| ``mnist_train_images_per_second`` | training throughput of the last epoch, all workers |
| ``mnist_train_epoch`` | the last finished epoch |
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Gauge

_FIGURES = {
    "mnist_train_loss": ("loss", "Mean training loss of the last epoch"),
    "mnist_train_accuracy": ("accuracy", "Training accuracy of the last epoch"),
    "mnist_train_test_accuracy": ("test_accuracy", "Test accuracy after the last epoch"),
    "mnist_train_images_per_second": ("images_per_s", "Training images per second in the last epoch"),
    "mnist_train_epoch": ("epoch", "The last finished epoch"),
}


class EpochGauges:
    """The gauges of one training run (created in the worker that reports)."""

    def __init__(self, run: str) -> None:
        self._tags = {"run": run}
        self._gauges = {
            key: Gauge(name, description, tag_keys=("run",)) for name, (key, description) in _FIGURES.items()
        }

    def report(self, metrics: Mapping[str, float]) -> None:
        """Set each gauge from an epoch's metrics (the dict given to ``ray.train.report``)."""
        for key, gauge in self._gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]), tags=self._tags)
