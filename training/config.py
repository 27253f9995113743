"""Typed configuration of one training run (validated once, from the CLI).

Each field's ``metadata["description"]`` is what the configuration reference (docs/) prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Everything a worker needs to train; passed to Ray Train as a plain dict."""

    data_dir: str = field(metadata={"description": "directory (or pyarrow URI) with the 4 IDX gz files"})
    epochs: int = field(default=12, metadata={"description": "passes over the training images"})
    batch_size: int = field(default=128, metadata={"description": "examples per worker per step"})
    learning_rate: float = field(
        default=1e-3, metadata={"description": "Adam, for one worker; scaled linearly with the worker count"}
    )
    num_workers: int = field(default=1, metadata={"description": "Ray Train workers"})
    seed: int = field(
        default=0, metadata={"description": "seeds shuffling, augmentation and initial weights"}
    )
    dropout: float = field(
        default=0.25, metadata={"description": "rate of the network's dropout layers, in [0, 1)"}
    )
    max_train_examples: int | None = field(
        default=None, metadata={"description": "train on this prefix only (at least one global batch): tests"}
    )
    max_test_examples: int | None = field(
        default=None, metadata={"description": "score on this prefix only: tests"}
    )
    augment: bool = field(
        default=True, metadata={"description": "on-the-fly augmentation (training/augment.py)"}
    )
    use_gpu: bool = field(default=False, metadata={"description": "one GPU per worker"})
    init_from: str | None = field(
        default=None, metadata={"description": "a published SavedModel directory to fine-tune from"}
    )

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        global_batch = self.batch_size * self.num_workers
        if self.max_train_examples is not None and self.max_train_examples < global_batch:
            raise ValueError(
                f"max train examples must be at least one global batch ({global_batch}), got {self.max_train_examples}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**values)
