"""Epoch time of our Ray Train loop against plain Keras ``model.fit``, same data and model, one run.

    RAY_TMPDIR=$(mktemp -d) .venv/bin/python -m bench.train_speed --epochs 3 --out bench/results/train_speed.json

Both sides train ``training.model.build_model`` on the same ``training.loop.make_dataset`` pipeline
(augmentation on, batch 128, Adam with the same cosine schedule) and evaluate on the test set after
every epoch. Plain Keras runs first, in this process, with TensorFlow's default threads (the whole
machine); then ``training.run.run_training`` runs one Ray Train worker with the default CPU
reservation. Figures: each epoch's seconds; the first epoch (tracing, warm-up) is left out of the
medians. The target of issue 12 is ours <= 1.2x plain Keras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_keras_epochs(epochs: int, examples: int | None, seed: int) -> list[float]:
    """Seconds per epoch of ``model.fit`` (with per-epoch validation) on our pipeline."""
    import keras
    import numpy as np

    from training.config import TrainConfig
    from training.data import load_mnist
    from training.loop import make_dataset
    from training.model import build_model

    config = TrainConfig(data_dir="", epochs=epochs, seed=seed)
    keras.utils.set_random_seed(seed)
    mnist = load_mnist()
    train = mnist.train.head(examples) if examples else mnist.train
    steps = len(train) // config.batch_size
    dataset = make_dataset(train, config.batch_size, seed, augment=True, threads=os.cpu_count() or 1)
    model = build_model(dropout=config.dropout)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=steps * epochs, alpha=0.02
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds.append(time.perf_counter() - self.started)

    test = (mnist.test.images.astype(np.float32) / 255.0, mnist.test.labels.astype(np.int64))
    model.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=test,
        validation_batch_size=1000,
        callbacks=[Timer()],
        verbose=0,
    )
    return seconds


def ray_train_epochs(epochs: int, smoke: bool, seed: int, store: Path) -> tuple[list[float], int]:
    """Seconds per epoch of ``training.run.run_training`` (1 worker, default CPUs) and its threads."""
    from training import arguments, publish, run

    argv = ["--model_path", str(store), "--epochs", str(epochs), "--seed", str(seed)]
    args = arguments.build_parser().parse_args([*argv, *(["--smoke-test"] if smoke else [])])
    config = arguments.config_from_args(args)
    result = run.run_training(config, args, arguments.resolve_run_name(args.run_name))
    history, _ = publish.read_state(result.checkpoint)
    return [float(m["epoch_s"]) for m in history], int(result.metrics.get("threads", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true", help="30,000 training images instead of 60,000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is left out of the medians)")

    from training.console import filtered_native_stderr
    from training.loop import cpu_only_environment

    os.environ.update(cpu_only_environment())
    with filtered_native_stderr():
        import tensorflow  # noqa: F401

    keras_s = plain_keras_epochs(args.epochs, 30_000 if args.smoke_test else None, args.seed)
    print(f"plain Keras model.fit: {', '.join(f'{s:.1f}' for s in keras_s)} s per epoch", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, threads = ray_train_epochs(args.epochs, args.smoke_test, args.seed, Path(tmp) / "mnist")
    print(
        f"Ray Train loop ({threads} threads): {', '.join(f'{s:.1f}' for s in ours_s)} s per epoch", flush=True
    )
    keras_median, ours_median = statistics.median(keras_s[1:]), statistics.median(ours_s[1:])
    ratio = ours_median / keras_median
    print(
        f"median epoch after the first: ours {ours_median:.1f} s, plain Keras {keras_median:.1f} s: {ratio:.2f}x"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "epochs": args.epochs,
            "train_examples": 30_000 if args.smoke_test else 60_000,
            "keras_epoch_s": [round(s, 2) for s in keras_s],
            "ours_epoch_s": [round(s, 2) for s in ours_s],
            "ours_threads": threads,
            "keras_median_s": round(keras_median, 2),
            "ours_median_s": round(ours_median, 2),
            "ratio": round(ratio, 3),
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
