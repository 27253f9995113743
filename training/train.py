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
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a script (``python training/train.py``): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_app import model_store  # noqa: E402
from training import robustness  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import DEFAULT_DATA_DIR, DatasetError, load_mnist  # noqa: E402

EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_GATE_REFUSED = 3
EXIT_VERSION_EXISTS = 4

SMOKE_TRAIN_EXAMPLES = 30_000
SMOKE_TEST_EXAMPLES = 2_000
SMOKE_ROBUSTNESS_PER_CATEGORY = 40
CHECKPOINTS_DIR = model_store.CHECKPOINTS_DIR  # inside the model store; not an integer, so no version
DEFAULT_RUN_NAME = "mnist-%Y%m%d-%H%M%S"
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs reserved per worker; TensorFlow gets as many threads (default: on a one-node "
        "cluster, its free CPUs shared among the workers; else 1)",
    )
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
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="disable augmentation (rotation, scale, shear, shift, elastic, stroke width)",
    )
    p.add_argument(
        "--init-from", default=None, help="fine-tune from a published version: 'latest' or a version number"
    )
    p.add_argument(
        "--min-accuracy", type=float, default=None, help="publish only if test accuracy >= this (0..1)"
    )
    p.add_argument(
        "--must-beat-latest",
        action="store_true",
        help="publish only if MNIST test accuracy beats the latest version's and robustness-set "
        "accuracy is not below it",
    )
    p.add_argument(
        "--robustness-per-category",
        type=int,
        default=None,
        help=f"images per category of the synthesised robustness set (default {robustness.DEFAULT_PER_CATEGORY}, "
        f"{SMOKE_ROBUSTNESS_PER_CATEGORY} with --smoke-test)",
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
        help=f"Ray Train run storage (checkpoints; default <model_path>/{CHECKPOINTS_DIR}, shared exactly "
        "when the model store is)",
    )
    p.add_argument(
        "--run-name",
        default=DEFAULT_RUN_NAME,
        help="Ray Train run name; strftime codes are filled in (UTC) when the run starts. A job that "
        "is submitted again with the same name resumes from that run's latest checkpoint, and "
        "publishes nothing if the run already published a version (default: %(default)s, a new "
        "run each time; e.g. 'finetune-%%Y%%m%%d' for one run per day)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        help="after publishing, keep the newest N versions and remove older ones, except those "
        "that --protect-from names (training/retention.py)",
    )
    p.add_argument(
        "--protect-from",
        action="append",
        default=[],
        metavar="CONFIG_OR_URL",
        help="with --keep-versions: a Serve config file or the http(s) URL of a running app whose "
        "labelled, canary and loaded versions are never removed (repeatable; $MNIST_TOKEN is sent "
        "to apps that check tokens)",
    )
    p.add_argument("--model-name", default=None, help="name in warmup records (default: store dir name)")
    p.add_argument(
        "--signing-key",
        default=os.environ.get("MNIST_SIGNING_KEY") or None,
        help="Ed25519 private key (PEM) that signs the version's manifest (default: $MNIST_SIGNING_KEY; "
        "none: unsigned manifest). See docs/security.md",
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny run for tests: {SMOKE_TRAIN_EXAMPLES} train / {SMOKE_TEST_EXAMPLES} test examples",
    )
    p.add_argument(
        "--max-train-examples",
        type=int,
        default=None,
        help="train on the first N training images (quick experiments; --smoke-test: "
        f"{SMOKE_TRAIN_EXAMPLES})",
    )
    return p


class UsageError(ValueError):
    """Arguments that cannot work; reported before any training starts."""


def _signing_key(path: str | None) -> Any:
    """The --signing-key, loaded before training so a bad key fails fast."""
    if path is None:
        return None
    from ray_app.manifest import load_private_key

    try:
        return load_private_key(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--signing-key {path}: {exc}") from exc


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
    from training.model import ARCHITECTURE

    trained = model_store.read_metrics(model_path, version).get("architecture")
    if trained is not None and trained != ARCHITECTURE:
        raise UsageError(
            f"--init-from {init_from}: version {version} is a {trained} network, this code trains "
            f"{ARCHITECTURE}; train from scratch (omit --init-from)"
        )
    return str(model_store.version_path(model_path, version).resolve())


def resolve_run_name(template: str, now: dt.datetime | None = None) -> str:
    """``--run-name`` with its strftime codes filled in (UTC); UsageError if not a safe directory name."""
    name = (now or dt.datetime.now(dt.UTC)).strftime(template)
    if not _RUN_NAME.fullmatch(name):
        raise UsageError(
            f"--run-name must give 1-128 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {name!r}"
        )
    return name


def published_by_run(model_path: str, run_name: str) -> int | None:
    """The version that the run ``run_name`` already published, if any (from each version's metrics)."""
    for version in reversed(model_store.list_versions(model_path)):
        try:
            if model_store.read_metrics(model_path, version).get("run_name") == run_name:
                return version
        except model_store.ModelStoreError:
            continue
    return None


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
    if args.robustness_per_category is not None and args.robustness_per_category < 1:
        raise UsageError(f"--robustness-per-category must be >= 1, got {args.robustness_per_category}")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise UsageError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise UsageError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.keep_versions is not None and args.keep_versions < 1:
        raise UsageError(f"--keep-versions must be >= 1, got {args.keep_versions}")
    if args.protect_from and args.keep_versions is None:
        raise UsageError("--protect-from needs --keep-versions")
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
            use_gpu=args.use_gpu,
            max_train_examples=args.max_train_examples or (SMOKE_TRAIN_EXAMPLES if args.smoke_test else None),
            max_test_examples=SMOKE_TEST_EXAMPLES if args.smoke_test else None,
            init_from=_resolve_init_from(args.model_path, args.init_from),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def default_cpus_per_worker(num_workers: int) -> float:
    """On a one-node cluster (a laptop, this machine), its free CPUs shared among the workers; else 1."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) != 1:
        return 1.0
    free_cpus = float(ray.available_resources().get("CPU", 1.0))
    return float(max(1, int(free_cpus // num_workers)))


def checkpoint_storage(args: argparse.Namespace) -> str:
    """Where Ray Train keeps this run's checkpoints: ``--storage-path`` or ``<model_path>/.checkpoints``."""
    if args.storage_path:
        return args.storage_path
    return str((model_store.store_path(args.model_path) / CHECKPOINTS_DIR).resolve())


def run_training(config: TrainConfig, args: argparse.Namespace, name: str):
    """Run the Ray Train job named ``name`` (resumed from its latest checkpoint in the storage, if
    an earlier driver of the same run left one); returns the ``ray.train.Result``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from training.console import filtered_native_stderr
    from training.loop import train_loop_per_worker

    with filtered_native_stderr():  # this imports TensorFlow
        from ray.train.tensorflow import TensorflowTrainer

    if not ray.is_initialized():
        # The workers' output stays in Ray's log files; the epochs are printed from checkpoints.
        ray.init(log_to_driver=False)
    cpus = args.cpus_per_worker or default_cpus_per_worker(config.num_workers)
    storage = checkpoint_storage(args)
    resuming = "://" not in storage and (Path(storage) / name / RUN_SNAPSHOT_FILE).is_file()
    print(
        f"Training {config.epochs} epoch(s) on {config.num_workers} worker(s), {cpus:g} CPU(s) each"
        f"{' + 1 GPU' if args.use_gpu else ''}; checkpoints in {storage}/{name}"
        f"{' (resuming this run from its latest checkpoint)' if resuming else ''}",
        flush=True,
    )
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if args.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return _fit_printing_epochs(trainer, Path(storage) / name, config.epochs, remote="://" in storage)


def _fit_printing_epochs(trainer, run_dir: Path, epochs: int, remote: bool):
    """``trainer.fit()``, printing each epoch as its checkpoint lands in ``run_dir`` (local storage)."""
    import threading

    from training.console import EpochPrinter

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    printer = None if remote else EpochPrinter(run_dir, epochs)
    while thread.is_alive():
        thread.join(timeout=1.0)
        if printer:
            printer.poll()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


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


def read_state(checkpoint) -> tuple[list[dict[str, Any]], list[int]]:
    """Per-epoch metrics and the epochs after which a failed run was resumed."""
    import json

    from training.loop import STATE_FILE

    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    return state["history"], state.get("resumed_after_epochs", [])


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


def _score(classify, test, prepared: robustness.Prepared) -> tuple[float, dict[str, float]]:
    import numpy as np

    mnist = float(np.mean(classify(test.images) == test.labels))
    return mnist, robustness.accuracy_by_category(prepared, classify(prepared.images))


def _describe(by_category: dict[str, float]) -> str:
    return ", ".join(f"{name} {value * 100:.1f} %" for name, value in by_category.items())


def export_and_publish(
    result,
    config: TrainConfig,
    args: argparse.Namespace,
    wall_s: float,
    run_name: str,
    signing_key: Any = None,
) -> int:
    """Export the final checkpoint, score it (MNIST test, robustness set), gate and publish.

    Returns an exit code.
    """
    from training import export
    from training.model import ARCHITECTURE

    mnist = load_mnist(config.data_dir)
    test = mnist.test.head(config.max_test_examples) if config.max_test_examples else mnist.test
    model = _load_trained_model(result.checkpoint, config.dropout)
    model_name = args.model_name or Path(args.model_path).resolve().name
    started = time.perf_counter()
    prepared = robustness_set(config, args)
    robustness_prepare_s = time.perf_counter() - started

    with model_store.staging_dir(args.model_path) as staged:
        export.save_model(model, staged)
        accuracy, robust = _score(export.load_classifier(staged), test, prepared)
        latest = model_store.latest_version(args.model_path)
        latest_scores = None
        if args.must_beat_latest and latest is not None:
            latest_accuracy, latest_robust = _score(
                export.load_classifier(model_store.version_path(args.model_path, latest)), test, prepared
            )
            latest_scores = Scores(latest_accuracy, latest_robust["overall"])
            print(
                f"Latest version {latest}: test accuracy {latest_accuracy:.4f}; robustness: "
                f"{_describe(latest_robust)}",
                flush=True,
            )
        print(f"Robustness set ({len(prepared.labels)} images): {_describe(robust)}", flush=True)
        refusal = gate(Scores(accuracy, robust["overall"]), args, latest_scores)
        if refusal:
            print(f"NOT PUBLISHED: {refusal}", file=sys.stderr, flush=True)
            return EXIT_GATE_REFUSED
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
            "git_commit": _git_commit(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "train_wall_s": round(wall_s, 2),
            "epoch_s": [round(float(m["epoch_s"]), 2) for m in history],
            "resumed_after_epochs": resumed_after,
            "signatures": [export.SERVING_DEFAULT, export.PREDICT_IMAGES],
        }
        export.write_metrics(staged, metrics)
        export.write_warmup_requests(staged, model_name, test.images[:4])
        try:
            version = model_store.publish(staged, args.model_path, args.version, signing_key)
        except model_store.VersionExistsError as exc:
            print(f"NOT PUBLISHED: {exc}", file=sys.stderr, flush=True)
            return EXIT_VERSION_EXISTS
    print(
        f"Published version {version} of {model_name} at "
        f"{model_store.version_path(args.model_path, version)} "
        f"(test accuracy {accuracy:.4f} on {len(test)} images; robustness set {robust['overall']:.4f})",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.use_gpu:  # before TensorFlow loads here or in a local Ray's workers: no CUDA errors
        from training.loop import cpu_only_environment

        os.environ.update(cpu_only_environment())
    try:
        config = config_from_args(args)
        run_name = resolve_run_name(args.run_name)
        load_mnist(config.data_dir)  # fail fast on missing or corrupt data, before Ray starts
        signing_key = _signing_key(args.signing_key)
    except model_store.VersionExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERSION_EXISTS
    except (UsageError, DatasetError, model_store.ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    done = published_by_run(args.model_path, run_name)
    if done is not None:  # a job submitted again after its run had published: nothing to redo
        print(f"Run {run_name} already published version {done}; nothing to do", flush=True)
        return 0
    started = time.perf_counter()
    try:
        result = run_training(config, args, run_name)
    except Exception as exc:  # Ray wraps worker failures; report them in one line
        print(f"error: training failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_TRAINING_FAILED
    if result.checkpoint is None:
        print(f"error: training produced no checkpoint ({result.error})", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    wall_s = time.perf_counter() - started
    last = result.metrics
    print(
        f"Training finished in {wall_s:.1f}s: {last.get('epoch', '?')} epoch(s), test accuracy "
        f"{last.get('test_accuracy', float('nan')):.4f} after the last one",
        flush=True,
    )
    code = export_and_publish(result, config, args, wall_s, run_name, signing_key)
    if code == 0 and args.keep_versions is not None:
        return _apply_retention(args)
    return code


def _apply_retention(args: argparse.Namespace) -> int:
    """``--keep-versions`` after a publish: the retention command's rules, its report printed."""
    from training import retention

    try:
        report = retention.apply(
            args.model_path,
            retention.Policy(keep_versions=args.keep_versions),
            args.protect_from,
            model_name=args.model_name,
            token=os.environ.get(retention.TOKEN_ENV),  # apps that check tokens answer /api/models with one
        )
    except retention.RetentionError as exc:
        print(f"warning: retention skipped, nothing removed: {exc}", file=sys.stderr, flush=True)
        return 0  # the new version is published; a store left untidy is no failure of training
    print(report.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
