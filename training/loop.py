"""The per-worker training loop that Ray Train runs on every worker.

Why a custom loop instead of ``model.fit``: Keras 3's ``fit`` crashes under
``MultiWorkerMirroredStrategy`` with two or more workers (keras-team/keras#20585,
ray-project/ray#47464). A ``strategy.run`` step with ``tf.nn.compute_average_loss`` needs
no patch. To avoid tf.data's multi-second stalls at epoch ends, each worker builds one
``repeat()``-ed dataset with fixed-size batches, a fixed number of steps per epoch, a fixed
``prefetch(2)`` with autotune off, and a single iterator for the whole run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "ckpt"
STATE_FILE = "train_state.json"


def _to_float(images, labels):
    import tensorflow as tf

    return tf.cast(images, tf.float32) / 255.0, tf.cast(labels, tf.int64)


def make_dataset(
    split,
    batch_size: int,
    seed: int,
    augment: bool,
    threads: int = 1,
    first_batch: int = 0,
    late_from_batch: int | None = None,
):
    """One endless, shuffled, batched dataset over ``split`` (stall-free settings, see module doc).

    With ``augment``, batches are augmented (training/augment.py); batch ``first_batch + i`` of
    the run is the ``i``-th one produced, and from ``late_from_batch`` on fewer images are changed.
    """
    import tensorflow as tf

    from training.augment import AugmentConfig, augment_batch, keep_share

    config = AugmentConfig()
    late = late_from_batch if late_from_batch is not None else 2**62

    def augment_fn(batch, index):
        images, labels = batch
        return augment_batch(images, config, keep_share(index, late, config)), labels

    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=True).map(_to_float)
    if augment:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(start=first_batch)))
        ds = ds.map(augment_fn, num_parallel_calls=threads, deterministic=True)
    ds = ds.prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = threads
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def restore_weights(model, saved_model_dir: str) -> None:
    """Load a published version's weights (its ``variables/``) into ``model``."""
    import tensorflow as tf

    prefix = str(Path(saved_model_dir) / "variables" / "variables")
    status = tf.train.Checkpoint(model=model).read(prefix)
    status.expect_partial().assert_existing_objects_matched()


def reserved_cpus() -> float:
    """CPUs Ray reserved for this worker (1.0 outside Ray)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # not in a Ray worker
        return 1.0


def cpu_only_environment() -> dict[str, str]:
    """Environment for a process that must not look for a GPU (and so not log CUDA errors)."""
    return {"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def configure_threads(cpus: float) -> int:
    """Give TensorFlow (and OpenMP) one thread per reserved CPU; returns the thread count.

    Ray sets ``OMP_NUM_THREADS=1`` for a 1-CPU worker; TensorFlow's own pools otherwise size
    themselves from the whole machine. Must run before TensorFlow executes its first op.
    """
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started in this process: keep its pools
        pass
    return threads


@dataclass
class _Progress:
    """What a run carries across epochs and resumes (saved beside each checkpoint)."""

    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics
    resumed_after: list[int] = field(default_factory=list)  # epochs after which a failed run resumed


def _splits(config):
    """The train and test splits, cut to ``max_*_examples`` when asked."""
    from training.data import load_mnist

    mnist = load_mnist(config.data_dir)
    train_split, test_split = mnist.train, mnist.test
    if config.max_train_examples:
        train_split = train_split.head(config.max_train_examples)
    if config.max_test_examples:
        test_split = test_split.head(config.max_test_examples)
    return train_split, test_split


def _model_and_optimizer(config, strategy, steps_per_epoch: int, world: int):
    """The model, Adam on a cosine schedule (learning rate scaled by the workers), and the epoch
    counter, created under ``strategy``; with the ``tf.train.Checkpoint`` that holds them."""
    import keras
    import tensorflow as tf

    from training.model import bn_momentum_for, build_model

    with strategy.scope():
        model = build_model(
            dropout=config.dropout, bn_momentum=bn_momentum_for(steps_per_epoch * config.epochs)
        )
        schedule = keras.optimizers.schedules.CosineDecay(
            config.learning_rate * world,
            decay_steps=steps_per_epoch * config.epochs,
            alpha=0.02,
        )
        optimizer = keras.optimizers.Adam(schedule)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    return model, optimizer, epoch_var, checkpoint


def _restore(config, checkpoint, model, epoch_var, rank: int) -> _Progress:
    """The run's own last checkpoint (a resume), else ``init_from``'s weights, else nothing."""
    import ray.train

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as ckpt_dir:
            checkpoint.read(str(Path(ckpt_dir) / CHECKPOINT_PREFIX)).expect_partial()
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        epoch = int(epoch_var.numpy())
        if rank == 0:
            print(
                f"warning: resumed after epoch {epoch} from the run's last checkpoint "
                "(a worker or the job's driver was lost)",
                flush=True,
            )
        return _Progress(state["history"], [*state.get("resumed_after_epochs", []), epoch])
    if config.init_from:
        restore_weights(model, config.init_from)
        print(f"[rank {rank}] initialised from {config.init_from}", flush=True)
    return _Progress()


def _steps(strategy, model, optimizer, global_batch: int):
    """``train_step(iterator)`` -> (summed loss, correct count) over all replicas, and
    ``eval_logits(images)``: both compiled."""
    import tensorflow as tf

    def step_fn(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
        return loss, correct

    @tf.function
    def train_step(dist_iterator):
        loss, correct = strategy.run(step_fn, args=next(dist_iterator))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    @tf.function
    def eval_logits(images):
        return model(images, training=False)

    return train_step, eval_logits


def _evaluate(eval_logits, images, labels) -> tuple[float, float]:
    """(loss, accuracy) on the test split, in chunks of 1,000 images."""
    import numpy as np
    import tensorflow as tf

    logits = np.concatenate([eval_logits(images[i : i + 1000]).numpy() for i in range(0, len(images), 1000)])
    loss = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)))
    return loss, float(np.mean(np.argmax(logits, -1) == labels))


def _report(checkpoint, metrics: dict[str, Any], progress: _Progress, rank: int) -> None:
    """The epoch to Ray Train: every worker writes its checkpoint (saving may use collectives);
    only rank 0's copy, with the progress beside it, is kept."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write(str(Path(tmp) / CHECKPOINT_PREFIX))
        if rank == 0:
            state = {"history": progress.history, "resumed_after_epochs": progress.resumed_after}
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point: train, evaluate and checkpoint once per epoch."""
    from training.config import TrainConfig

    config = TrainConfig.from_dict(config_dict)
    # Ray's TF backend sets TF_USE_LEGACY_KERAS=1 for tf-keras users; we use Keras 3.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    if not config.use_gpu:
        os.environ.update(cpu_only_environment())
    threads = configure_threads(reserved_cpus())
    import keras
    import numpy as np
    import ray.train
    import tensorflow as tf

    from training.augment import AugmentConfig
    from training.metrics import EpochGauges

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    keras.utils.set_random_seed(config.seed)

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    train_split, test_split = _splits(config)
    global_batch = config.batch_size * world
    steps_per_epoch = len(train_split) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_split)} examples are fewer than one global batch")

    model, optimizer, epoch_var, checkpoint = _model_and_optimizer(config, strategy, steps_per_epoch, world)
    progress = _restore(config, checkpoint, model, epoch_var, rank)
    start_epoch = int(epoch_var.numpy())
    late_from_batch = max(0, config.epochs - AugmentConfig().late_epochs) * steps_per_epoch

    def dataset_fn(input_context: tf.distribute.InputContext):
        shard = train_split.shard(input_context.input_pipeline_id, input_context.num_input_pipelines)
        return make_dataset(
            shard,
            input_context.get_per_replica_batch_size(global_batch),
            config.seed + input_context.input_pipeline_id,
            config.augment,
            threads,
            first_batch=start_epoch * steps_per_epoch,  # a resumed run's augmentation continues
            late_from_batch=late_from_batch,
        )

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_step, eval_logits = _steps(strategy, model, optimizer, global_batch)
    test_images = test_split.images.astype(np.float32) / 255.0
    test_labels = test_split.labels.astype(np.int64)

    gauges = EpochGauges(context.get_experiment_name()) if rank == 0 else None  # for Grafana
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            loss_sum = correct_sum = 0.0
            for _ in range(steps_per_epoch):
                loss, correct = train_step(iterator)
                loss_sum += float(loss)
                correct_sum += float(correct)
            train_s = time.perf_counter() - started
            test_loss, test_accuracy = _evaluate(eval_logits, test_images, test_labels)
            epoch_var.assign(epoch)
            metrics = {
                "epoch": epoch,
                "loss": loss_sum / steps_per_epoch,
                "accuracy": correct_sum / (steps_per_epoch * global_batch),
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "epoch_s": time.perf_counter() - started,
                "train_s": train_s,
                "images_per_s": steps_per_epoch * global_batch / train_s,
                "workers": world,
                "threads": threads,
            }
            progress.history.append(metrics)
            _report(checkpoint, metrics, progress, rank)
            if gauges is not None:
                gauges.report(metrics)
            if rank == 0:  # the figures are the same on every rank: one line per epoch
                print(
                    f"[rank {rank}] epoch {epoch}/{config.epochs}: loss {metrics['loss']:.4f} "
                    f"acc {metrics['accuracy']:.4f} test_acc {test_accuracy:.4f} "
                    f"{metrics['epoch_s']:.1f}s ({metrics['images_per_s']:.0f} img/s)",
                    flush=True,
                )
    finally:  # the gauges' refresher thread stops with the run, also when an epoch fails
        if gauges is not None:
            gauges.close()
