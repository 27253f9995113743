"""The Ray Train run: a ``TensorflowTrainer`` over ``training.loop``'s per-worker loop, its
checkpoints in the storage (a run started again resumes from its latest), epochs printed as
their checkpoints land."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from ray_app import model_store
from training.config import TrainConfig

CHECKPOINTS_DIR = model_store.CHECKPOINTS_DIR  # inside the model store; not an integer, so no version
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


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
