"""Typed configuration of one training run (validated once, from the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Everything a worker needs to train; passed to Ray Train as a plain dict."""

    data_dir: str
    epochs: int = 12
    batch_size: int = 128  # per worker
    learning_rate: float = 1e-3  # for one worker; scaled linearly with the worker count
    num_workers: int = 1
    seed: int = 0
    dropout: float = 0.25
    max_train_examples: int | None = None  # smoke tests train on a prefix
    max_test_examples: int | None = None
    augment: bool = True
    use_gpu: bool = False
    init_from: str | None = None  # a published SavedModel directory to fine-tune from

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
