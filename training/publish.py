"""A finished run published: its last checkpoint exported as a SavedModel in the store's staging
directory, scored and gated (``training.gate``), its metrics and warmup records written, then
renamed into place as the next version (``ray_app.model_store``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ray_app import model_store
from training import gate, robustness
from training.config import TrainConfig
from training.data import load_mnist


class GateRefusedError(Exception):
    """A gate refused the model: nothing was published."""


def published_by_run(model_path: str, run_name: str) -> int | None:
    """The version that the run ``run_name`` already published, if any (from each version's metrics)."""
    for version in reversed(model_store.list_versions(model_path)):
        try:
            if model_store.read_metrics(model_path, version).get("run_name") == run_name:
                return version
        except model_store.ModelStoreError:
            continue
    return None


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_trained_model(checkpoint, dropout: float):
    import tensorflow as tf

    from training.loop import CHECKPOINT_PREFIX
    from training.model import build_model

    model = build_model(dropout=dropout)
    with checkpoint.as_directory() as ckpt_dir:
        tf.train.Checkpoint(model=model).read(
            str(Path(ckpt_dir) / CHECKPOINT_PREFIX)
        ).expect_partial().assert_existing_objects_matched()
    return model


def read_state(checkpoint) -> tuple[list[dict[str, Any]], list[int]]:
    """Per-epoch metrics and the epochs after which a failed run was resumed."""
    from training.loop import STATE_FILE

    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    return state["history"], state.get("resumed_after_epochs", [])


def export_and_publish(
    result,
    config: TrainConfig,
    args: argparse.Namespace,
    wall_s: float,
    run_name: str,
    signing_key: Any = None,
) -> int:
    """Export the final checkpoint, score it (MNIST test, robustness set), gate and publish.

    Returns the published version. ``GateRefusedError`` when a gate refuses it,
    ``model_store.VersionExistsError`` when ``--version`` was taken meanwhile: nothing published.
    """
    from training import export
    from training.model import ARCHITECTURE

    mnist = load_mnist(config.data_dir)
    test = mnist.test.head(config.max_test_examples) if config.max_test_examples else mnist.test
    model = load_trained_model(result.checkpoint, config.dropout)
    model_name = args.model_name or Path(args.model_path).resolve().name
    started = time.perf_counter()
    prepared = gate.robustness_set(config, args)
    robustness_prepare_s = time.perf_counter() - started

    with model_store.staging_dir(args.model_path) as staged:
        export.save_model(model, staged)
        accuracy, robust = gate.score(export.load_classifier(staged), test, prepared)
        latest = model_store.latest_version(args.model_path)
        latest_scores = None
        if args.must_beat_latest and latest is not None:
            latest_accuracy, latest_robust = gate.score(
                export.load_classifier(model_store.version_path(args.model_path, latest)), test, prepared
            )
            latest_scores = gate.Scores(latest_accuracy, latest_robust["overall"])
            print(
                f"Latest version {latest}: test accuracy {latest_accuracy:.4f}; robustness: "
                f"{gate.describe(latest_robust)}",
                flush=True,
            )
        print(f"Robustness set ({len(prepared.labels)} images): {gate.describe(robust)}", flush=True)
        refusal = gate.gate(gate.Scores(accuracy, robust["overall"]), args, latest_scores)
        if refusal:
            raise GateRefusedError(refusal)
        history, resumed_after = read_state(result.checkpoint)
        metrics: dict[str, Any] = {
            "test_accuracy": accuracy,
            "test_examples": len(test),
            "test_loss": result.metrics.get("test_loss"),
            "train_accuracy": result.metrics.get("accuracy"),
            "robustness": robust,
            "robustness_set": {
                "generator": "training/robustness.py",
                "seed": robustness.DEFAULT_SEED,
                "images": int(len(prepared.labels)),
                "per_category": int(len(prepared.labels)) // len(robustness.CATEGORIES),
                "rejected_by_preprocessing": int((~prepared.ok).sum()),
                "prepare_s": round(robustness_prepare_s, 2),
            },
            "epochs": config.epochs,
            "workers": config.num_workers,
            "threads_per_worker": result.metrics.get("threads"),
            "batch_size_per_worker": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "augment": config.augment,
            "train_examples": config.max_train_examples or len(mnist.train),
            "data_source": mnist.source,
            "init_from": config.init_from,
            "run_name": run_name,
            "architecture": ARCHITECTURE,
            "git_commit": git_commit(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "train_wall_s": round(wall_s, 2),
            "epoch_s": [round(float(m["epoch_s"]), 2) for m in history],
            "resumed_after_epochs": resumed_after,
            "signatures": [export.SERVING_DEFAULT, export.PREDICT_IMAGES],
        }
        export.write_metrics(staged, metrics)
        export.write_warmup_requests(staged, model_name, test.images[:4])
        version = model_store.publish(staged, args.model_path, args.version, signing_key)
    print(
        f"Published version {version} of {model_name} at "
        f"{model_store.version_path(args.model_path, version)} "
        f"(test accuracy {accuracy:.4f} on {len(test)} images; robustness set {robust['overall']:.4f})",
        flush=True,
    )
    return version
