"""The train CLI's arguments: the parser, their checks, and the ``TrainConfig`` they give.

Everything here runs before Ray starts or TensorFlow loads, so a bad flag fails at once
(``UsageError``: exit code 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from typing import Any

from ray_app import model_store
from training import robustness
from training.config import TrainConfig
from training.data import DEFAULT_DATA_DIR

SMOKE_TRAIN_EXAMPLES = 30_000
SMOKE_TEST_EXAMPLES = 2_000
SMOKE_ROBUSTNESS_PER_CATEGORY = 40
DEFAULT_RUN_NAME = "mnist-%Y%m%d-%H%M%S"
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
        help=f"Ray Train run storage (checkpoints; default <model_path>/{model_store.CHECKPOINTS_DIR}, shared exactly "
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


def signing_key(path: str | None) -> Any:
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
