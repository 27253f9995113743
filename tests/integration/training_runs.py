"""What the training tests watch for in a run's checkpoint storage."""

from __future__ import annotations

import json
from pathlib import Path

from training.train import CHECKPOINTS_DIR, RUN_SNAPSHOT_FILE


def first_checkpoint_registered(store: Path) -> bool:
    """Ray Train's controller has taken epoch 1's checkpoint of some run in ``store`` (the files
    alone may still be unreported)."""
    for snapshot in store.glob(f"{CHECKPOINTS_DIR}/*/{RUN_SNAPSHOT_FILE}"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False
