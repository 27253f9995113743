"""CLI: train MNIST with Ray Train and publish the result as the next model version.

    python training/train.py --model_path models/mnist --epochs 12 [--version 7]
    ray job submit --working-dir . -- python training/train.py --model_path ... --epochs 3

Exit codes: 0 published, 1 training failed, 2 bad arguments or data,
3 refused by a quality gate (nothing published), 4 the version already exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (``python training/train.py``): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_app import model_store  # noqa: E402
from training import arguments, publish, run  # noqa: E402
from training.data import DatasetError, load_mnist  # noqa: E402

EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_GATE_REFUSED = 3
EXIT_VERSION_EXISTS = 4


def main(argv: list[str] | None = None) -> int:
    args = arguments.build_parser().parse_args(argv)
    if not args.use_gpu:  # before TensorFlow loads here or in a local Ray's workers: no CUDA errors
        from training.loop import cpu_only_environment

        os.environ.update(cpu_only_environment())
    try:
        config = arguments.config_from_args(args)
        run_name = arguments.resolve_run_name(args.run_name)
        load_mnist(config.data_dir)  # fail fast on missing or corrupt data, before Ray starts
        signing_key = arguments.signing_key(args.signing_key)
    except model_store.VersionExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_VERSION_EXISTS
    except (arguments.UsageError, DatasetError, model_store.ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    done = publish.published_by_run(args.model_path, run_name)
    if done is not None:  # a job submitted again after its run had published: nothing to redo
        print(f"Run {run_name} already published version {done}; nothing to do", flush=True)
        return 0
    started = time.perf_counter()
    try:
        result = run.run_training(config, args, run_name)
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
    try:
        publish.export_and_publish(result, config, args, wall_s, run_name, signing_key)
    except (publish.GateRefusedError, model_store.VersionExistsError) as exc:
        print(f"NOT PUBLISHED: {exc}", file=sys.stderr, flush=True)
        return EXIT_GATE_REFUSED if isinstance(exc, publish.GateRefusedError) else EXIT_VERSION_EXISTS
    if args.keep_versions is not None:
        return _apply_retention(args)
    return 0


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
