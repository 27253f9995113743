"""The quality gate: a trained model scored on MNIST's test set and the robustness set, and
compared with the bars asked for (``--min-accuracy``, ``--must-beat-latest``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from training import robustness
from training.arguments import SMOKE_ROBUSTNESS_PER_CATEGORY
from training.config import TrainConfig


@dataclass(frozen=True)
class Scores:
    """What the gates compare: MNIST test accuracy and accuracy on the robustness set (overall)."""

    mnist: float
    robustness: float


def gate(scores: Scores, args: argparse.Namespace, latest: Scores | None) -> str | None:
    """Why a model must not be published, or None when it passes every gate asked for."""
    if args.min_accuracy is not None and scores.mnist < args.min_accuracy:
        return f"test accuracy {scores.mnist:.4f} is below --min-accuracy {args.min_accuracy:.4f}"
    if args.must_beat_latest and latest is not None:
        if scores.mnist <= latest.mnist:
            return (
                f"test accuracy {scores.mnist:.4f} does not beat the latest version's "
                f"{latest.mnist:.4f} (--must-beat-latest)"
            )
        if scores.robustness < latest.robustness:
            return (
                f"robustness-set accuracy {scores.robustness:.4f} is below the latest version's "
                f"{latest.robustness:.4f} (--must-beat-latest)"
            )
    return None


def robustness_per_category(config: TrainConfig, args: argparse.Namespace) -> int:
    """Images per category of the robustness set: the flag, else a small set for smoke runs."""
    if args.robustness_per_category:
        return args.robustness_per_category
    return SMOKE_ROBUSTNESS_PER_CATEGORY if config.max_test_examples else robustness.DEFAULT_PER_CATEGORY


def robustness_set(config: TrainConfig, args: argparse.Namespace) -> robustness.Prepared:
    """The synthesised robustness set, preprocessed as the server does (same seed every run)."""
    per_category = robustness_per_category(config, args)
    return robustness.build(per_category, seed=robustness.DEFAULT_SEED)


def score(classify, test, prepared: robustness.Prepared) -> tuple[float, dict[str, float]]:
    import numpy as np

    mnist = float(np.mean(classify(test.images) == test.labels))
    return mnist, robustness.accuracy_by_category(prepared, classify(prepared.images))


def describe(by_category: dict[str, float]) -> str:
    return ", ".join(f"{name} {value * 100:.1f} %" for name, value in by_category.items())
