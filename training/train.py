"""CLI: train MNIST with Ray Train and publish the result as the next model version.

    python training/train.py --model_path models/mnist --epochs 12 [--version 7]
    ray job submit --working-dir . -- python training/train.py --model_path ... --epochs 3

Exit codes: 0 published, 1 training failed, 2 bad arguments or data,
3 refused by a quality gate (nothing published), 4 the version already exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a script (``python training/train.py``): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import model_store  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import DEFAULT_DATA_DIR, DatasetError, load_mnist  # noqa: E402

EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_GATE_REFUSED = 3
EXIT_VERSION_EXISTS = 4

SMOKE_TRAIN_EXAMPLES = 30_000
SMOKE_TEST_EXAMPLES = 2_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model_path",
        "--model-path",
        dest="model_path",
        required=True,
        help="model store directory; versions go to <model_path>/<version>/",
    )
    p.add_argument("--epochs", type=int, default=12, help="passes over the training set (default 12)")
    p.add_argument(
        "--version",
        type=int,
        default=None,
        help="version to publish (default: one past the highest existing)",
    )
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU/CPU slot)")
    p.add_argument("--use-gpu", action="store_true", help="give each worker one GPU")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument("--batch-size", type=int, default=128, help="examples per worker per step")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="Adam learning rate for one worker, scaled linearly by --num-workers",
    )
    p.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="directory (or pyarrow URI such as s3://bucket/mnist) with the 4 IDX gz files",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="disable random-shift augmentation")
    p.add_argument(
        "--init-from", default=None, help="fine-tune from a published version: 'latest' or a version number"
    )
    p.add_argument(
        "--min-accuracy", type=float, default=None, help="publish only if test accuracy >= this (0..1)"
    )
    p.add_argument(
        "--must-beat-latest",
        action="store_true",
        help="publish only if test accuracy beats the latest published version's",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="restarts from the last epoch checkpoint after a worker dies",
    )
    p.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train run storage (checkpoints); shared storage on multi-node clusters",
    )
    p.add_argument("--model-name", default=None, help="name in warmup records (default: store dir name)")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny run for tests: {SMOKE_TRAIN_EXAMPLES} train / {SMOKE_TEST_EXAMPLES} test examples",
    )
    return p


class UsageError(ValueError):
    """Arguments that cannot work; reported before any training starts."""


def _resolve_init_from(model_path: str, init_from: str | None) -> str | None:
    if init_from is None:
        return None
    if init_from == "latest":
        version = model_store.latest_version(model_path)
        if version is None:
            raise UsageError(f"--init-from latest: no published version in {model_path}")
    elif init_from.isdigit():
        version = int(init_from)
        if version not in model_store.list_versions(model_path):
            raise UsageError(f"--init-from {version}: no such version in {model_path}")
    else:
        raise UsageError(f"--init-from must be 'latest' or a version number, got {init_from!r}")
    return str(model_store.version_path(model_path, version).resolve())


def _git_commit() -> str:
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise UsageError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.version is not None:
        model_store.check_version_free(args.model_path, args.version)
    try:
        return TrainConfig(
            data_dir=args.data_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            num_workers=args.num_workers,
            seed=args.seed,
            augment=not args.no_augment,
            max_train_examples=SMOKE_TRAIN_EXAMPLES if args.smoke_test else None,
            max_test_examples=SMOKE_TEST_EXAMPLES if args.smoke_test else None,
            init_from=_resolve_init_from(args.model_path, args.init_from),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_training(config: TrainConfig, args: argparse.Namespace):
    """Run the Ray Train job; returns the ``ray.train.Result``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from training.loop import train_loop_per_worker

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=f"mnist-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}",
            storage_path=args.storage_path,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def _load_trained_model(checkpoint, dropout: float):
    import tensorflow as tf

    from training.loop import CHECKPOINT_PREFIX
    from training.model import build_model

    model = build_model(dropout=dropout)
    with checkpoint.as_directory() as ckpt_dir:
        tf.train.Checkpoint(model=model).read(
            str(Path(ckpt_dir) / CHECKPOINT_PREFIX)
        ).expect_partial().assert_existing_objects_matched()
    return model


def _read_history(checkpoint) -> list[dict[str, Any]]:
    import json

    from training.loop import STATE_FILE

    with checkpoint.as_directory() as ckpt_dir:
        return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]


def gate(accuracy: float, args: argparse.Namespace, latest_accuracy: float | None) -> str | None:
    """Why a model must not be published, or None when it passes every gate asked for."""
    if args.min_accuracy is not None and accuracy < args.min_accuracy:
        return f"test accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy:.4f}"
    if args.must_beat_latest and latest_accuracy is not None and accuracy <= latest_accuracy:
        return (
            f"test accuracy {accuracy:.4f} does not beat the latest version's "
            f"{latest_accuracy:.4f} (--must-beat-latest)"
        )
    return None


def export_and_publish(result, config: TrainConfig, args: argparse.Namespace, wall_s: float) -> int:
    """Export the final checkpoint, apply the gates and publish. Returns an exit code."""
    from training import export
    from training.model import ARCHITECTURE

    mnist = load_mnist(config.data_dir)
    test = mnist.test.head(config.max_test_examples) if config.max_test_examples else mnist.test
    model = _load_trained_model(result.checkpoint, config.dropout)
    model_name = args.model_name or Path(args.model_path).resolve().name

    with model_store.staging_dir(args.model_path) as staged:
        export.save_model(model, staged)
        accuracy = export.evaluate_saved_model(staged, test.images, test.labels)
        latest = model_store.latest_version(args.model_path)
        latest_accuracy = None
        if args.must_beat_latest and latest is not None:
            latest_accuracy = export.evaluate_saved_model(
                model_store.version_path(args.model_path, latest), test.images, test.labels
            )
        refusal = gate(accuracy, args, latest_accuracy)
        if refusal:
            print(f"NOT PUBLISHED: {refusal}", file=sys.stderr, flush=True)
            return EXIT_GATE_REFUSED
        history = _read_history(result.checkpoint)
        metrics: dict[str, Any] = {
            "test_accuracy": accuracy,
            "test_examples": len(test),
            "test_loss": result.metrics.get("test_loss"),
            "train_accuracy": result.metrics.get("accuracy"),
            "epochs": config.epochs,
            "workers": config.num_workers,
            "batch_size_per_worker": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "train_examples": config.max_train_examples or len(mnist.train),
            "data_source": mnist.source,
            "init_from": config.init_from,
            "architecture": ARCHITECTURE,
            "git_commit": _git_commit(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "train_wall_s": round(wall_s, 2),
            "epoch_s": [round(float(m["epoch_s"]), 2) for m in history],
            "signatures": [export.SERVING_DEFAULT, export.PREDICT_IMAGES],
        }
        export.write_metrics(staged, metrics)
        export.write_warmup_requests(staged, model_name, test.images[:4])
        try:
            version = model_store.publish(staged, args.model_path, args.version)
        except model_store.VersionExistsError as exc:
            print(f"NOT PUBLISHED: {exc}", file=sys.stderr, flush=True)
            return EXIT_VERSION_EXISTS
    print(
        f"Published version {version} of {model_name} at "
        f"{model_store.version_path(args.model_path, version)} "
        f"(test accuracy {accuracy:.4f} on {len(test)} images)",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        load_mnist(config.data_dir)  # fail fast on missing or corrupt data, before Ray starts
    except model_store.VersionExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERSION_EXISTS
    except (UsageError, DatasetError, model_store.ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    started = time.perf_counter()
    try:
        result = run_training(config, args)
    except Exception as exc:  # Ray wraps worker failures; report them in one line
        print(f"error: training failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_FAILED
    if result.checkpoint is None:
        print(f"error: training produced no checkpoint ({result.error})", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    wall_s = time.perf_counter() - started
    print(f"Training finished in {wall_s:.1f}s: {result.metrics}", flush=True)
    return export_and_publish(result, config, args, wall_s)


if __name__ == "__main__":
    sys.exit(main())
