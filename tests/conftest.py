"""Shared fixtures: a small, really trained model published into a temporary model store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def train_quick_model(export_dir: Path, examples: int = 12000, seed: int = 0) -> None:
    """Train the product's CNN for one short epoch in-process (no Ray) and export it (~10 s)."""
    import keras
    import numpy as np

    from training import export
    from training.data import load_mnist
    from training.model import bn_momentum_for, build_model

    keras.utils.set_random_seed(seed)
    train = load_mnist().train.head(examples)
    model = build_model(bn_momentum=bn_momentum_for(examples // 128))  # one short epoch
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(train.images.astype(np.float32) / 255.0, train.labels, batch_size=128, epochs=1, verbose=0)
    export.save_model(model, export_dir)
    export.write_warmup_requests(export_dir, "mnist", load_mnist().test.images[:2])


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory) -> Path:
    """One trained SavedModel (not in a store); copy it into stores as versions."""
    path = tmp_path_factory.mktemp("export") / "model"
    train_quick_model(path)
    return path


def publish_copy(export_dir: Path, store: Path, version: int) -> Path:
    """Publish a copy of ``export_dir`` as ``version`` the way training does (staging + rename)."""
    from training import model_store

    with model_store.staging_dir(store) as staged:
        shutil.copytree(export_dir, staged, dirs_exist_ok=True)
        model_store.publish(staged, store, version)
    return model_store.version_path(store, version)


@pytest.fixture
def store(tmp_path, trained_export) -> Path:
    """A model store holding version 1."""
    base = tmp_path / "mnist"
    publish_copy(trained_export, base, 1)
    return base
