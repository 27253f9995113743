"""Shared fixtures: a small, really trained model published into a temporary model store; and
the front door every Ray this suite starts gets, as users get it."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

HAPROXY_STATE_DIR_VARIABLE = "MNIST_TEST_HAPROXY_STATE_DIR"


def pytest_configure(config) -> None:
    """Every Ray these tests start uses the app's front door (HAProxy + direct ingress), exactly
    as ``ray start`` does in the local journey: Serve reads it from the environment of the process
    that starts Ray, once, so it is set before anything imports Serve. HAProxy gets a state
    directory of this run's own (leftover checks find its processes there) and free ports for its
    stats and metrics pages. ``RAY_SERVE_ENABLE_HA_PROXY=0`` runs the suite through Serve's
    Python proxy instead."""
    from client.local.leftovers import new_state_dir
    from client.local.ports import with_free_side_ports
    from ray_app.front_door import front_door_env, node_cpus

    state_dir = new_state_dir()
    env = with_free_side_ports(front_door_env(node_cpus(), state_dir=state_dir))
    os.environ.update(env, **{HAPROXY_STATE_DIR_VARIABLE: state_dir}, **_direct_ingress_ports())
    # pytest-xdist hands out modules largest first by default (most tests); this suite orders
    # them itself (pytest_collection_modifyitems), so xdist keeps the collection's order.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# The modules that take longest (in this order: each is minutes of one pytest-xdist worker on the
# 2-core CI machine; bench/README.md#the-test-suite-2026-12-02 has the figures).
LONGEST_MODULES = (
    "tests.integration.test_local_journey",
    "tests.integration.test_training",
    "tests.integration.test_training_resume",
    "tests.integration.test_bench",
    "tests.integration.test_autoscaling",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first, longest first, then the others in the order collected: with
    ``--dist loadfile``, each pytest-xdist worker starts on one of them and the many short modules
    fill in beside, so no long module starts last and runs alone at the end."""
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: order kept within


DIRECT_INGRESS_PORTS_PER_WORKER = 250


def _direct_ingress_ports() -> dict[str, str]:
    """Under pytest-xdist, each worker process's Ray gets its own slice of Serve's direct-ingress
    port ranges (HTTP 30000-31000, gRPC 40000-41000): Serve hands those ports out without
    checking that they are free, so two clusters on one machine would collide."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return {}
    first = int(worker[2:]) * DIRECT_INGRESS_PORTS_PER_WORKER
    if first + DIRECT_INGRESS_PORTS_PER_WORKER > 1000:
        raise RuntimeError(f"at most 4 xdist workers share Serve's direct-ingress ranges, not {worker}")
    ranges = {}
    for protocol, base in (("HTTP", 30000), ("GRPC", 40000)):
        ranges[f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT"] = str(base + first)
        ranges[f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT"] = str(
            base + first + DIRECT_INGRESS_PORTS_PER_WORKER
        )
    return ranges


def pytest_unconfigure(config) -> None:
    state_dir = os.environ.get(HAPROXY_STATE_DIR_VARIABLE)
    if state_dir:
        shutil.rmtree(state_dir, ignore_errors=True)


def train_quick_model(export_dir: Path, examples: int = 12000, seed: int = 0, epochs: int = 1) -> None:
    """Train the product's CNN in-process (no Ray) and export it (by default one short epoch: ~15 s)."""
    import keras
    import numpy as np

    from training import export
    from training.data import load_mnist
    from training.model import bn_momentum_for, build_model

    keras.utils.set_random_seed(seed)
    train = load_mnist().train.head(examples)
    steps = max(examples // 128, 1) * epochs
    model = build_model(bn_momentum=bn_momentum_for(steps))
    model.compile(
        # Cosine decay to zero over the run: the last steps settle (98.4 % after 2 epochs with a
        # constant 2e-3, measured).
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(train.images.astype(np.float32) / 255.0, train.labels, batch_size=128, epochs=epochs, verbose=0)
    export.save_model(model, export_dir)
    export.write_warmup_requests(export_dir, "mnist", load_mnist().test.images[:2])


REPO = Path(__file__).resolve().parents[1]
# What the quick model is made of: a change to any of these trains it again.
QUICK_MODEL_INPUTS = ("tests/conftest.py", "training/model.py", "training/export.py", "training/data.py")


def _quick_model_key() -> str:
    import keras
    import tensorflow as tf

    digest = hashlib.sha256(f"tf {tf.__version__} keras {keras.__version__}".encode())
    for name in QUICK_MODEL_INPUTS:
        digest.update((REPO / name).read_bytes())
    for data_file in sorted((REPO / "data" / "mnist").iterdir()):
        digest.update(f"{data_file.name} {data_file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_export(request, tmp_path_factory) -> Path:
    """One trained SavedModel (not in a store); copy it into stores as versions, never change it.

    Trained once for every test process of a run (pytest-xdist's workers wait on a lock) and kept
    in pytest's cache, keyed by the code and data that make it, so the README's second pytest
    phase and later runs reuse it; without the cache plugin, in the run's shared temp directory."""
    cache = getattr(request.config, "cache", None)
    root = (
        Path(cache.mkdir("quick-model")) if cache else tmp_path_factory.getbasetemp().parent / "quick-model"
    )
    root.mkdir(parents=True, exist_ok=True)
    key = _quick_model_key()
    model = root / key / "model"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.is_dir():
            for stale in root.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
            staging = root / f".{key}-{os.getpid()}"
            train_quick_model(staging / "model")
            staging.rename(root / key)  # whole or not at all
    return model


def publish_copy(export_dir: Path, store: Path, version: int) -> Path:
    """Publish a copy of ``export_dir`` as ``version`` the way training does (staging + rename)."""
    from ray_app import model_store

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


def tamper_with_weights(version_dir: Path) -> None:
    """Turn a published version into another *valid* SavedModel, as an attacker with write access
    to the store would: load it, shift its output layer so each digit reads as the next one, save
    it again, and put the original version's ``assets.extra`` (metrics, warmup, manifest) back in."""
    import tempfile

    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    output_layer, seen, todo = {}, set(), [loaded]
    while todo:  # every variable the restored object tracks (it has no ``variables`` attribute)
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, tf.Variable) and node.name.startswith("logits/"):  # the output Dense layer
            output_layer[node.name] = node  # one variable can be reached through several paths
        todo.extend(node._trackable_children().values())
    assert len(output_layer) == 2, f"expected the output layer's kernel and bias: {sorted(output_layer)}"
    for variable in output_layer.values():
        variable.assign(tf.roll(variable, shift=1, axis=-1))
    with tempfile.TemporaryDirectory() as work:
        resaved = Path(work) / "model"
        tf.saved_model.save(loaded, str(resaved), signatures=dict(loaded.signatures))
        shutil.rmtree(resaved / "assets.extra", ignore_errors=True)
        shutil.copytree(version_dir / "assets.extra", resaved / "assets.extra")
        for child in version_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.copytree(resaved, version_dir, dirs_exist_ok=True)
