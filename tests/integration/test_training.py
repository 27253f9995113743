"""Ray Train for real: a 2-worker run (the distributed path) loses its workers after epoch 1,
resumes, and publishes once; the gate publishes nothing below its bar. The 1-worker path, and a
job whose driver is lost: test_training_resume.py. What a 2-worker run learns, and the signatures
and warm-up records it exports: the journey's version 1 (test_local_journey.py).

One local Ray cluster is shared by the module; each run uses the CLI's ``main()``.
"""

import psutil
import pytest

from ray_app import model_store
from tests.integration.cluster import local_ray
from tests.integration.training_runs import train_workers_killed_after_epoch_1
from training import arguments, robustness, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small: this run is about losing workers and resuming (what it learns is the journey's to check).
# 8,192 images x 2 epochs, 64 steps of 2 x 64 each: epoch 2 lasts long enough for the kill to land in it.
TRAIN_EXAMPLES = 8192
EPOCHS = 2


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's Ray (no job API needed: runs call ``train.main``). Checks that no Ray process is
    left after."""
    with local_ray(num_cpus=2, log_to_driver=False) as node_id:
        yield node_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("models") / "mnist"


RUN = "two-workers"


@pytest.fixture(scope="module")
def runs(ray_cluster, store):
    """Version 1 from 2 workers, which lose their Ray Train workers to SIGKILL after epoch 1 and
    resume from its checkpoint."""
    # Per-worker batch 64 and learning rate 5e-4: the global batch (2 x 64) and rate (2 x 5e-4) of
    # a 1-worker run's defaults.
    argv = [
        "--model_path", str(store), "--smoke-test", "--max-train-examples", str(TRAIN_EXAMPLES),
        "--epochs", str(EPOCHS), "--seed", "1", "--num-workers", "2", "--batch-size", "64",
        "--learning-rate", "5e-4", "--run-name", RUN,
    ]  # fmt: skip
    with train_workers_killed_after_epoch_1(
        store,
        RUN,
        lambda: psutil.Process().children(recursive=True),  # this test's own cluster
    ) as killed:
        assert train.main(argv) == 0
    return {"store": store, "killed": killed}


@pytest.fixture(scope="module")
def published(runs):
    """The model store holding the version."""
    return runs["store"]


def _metrics(store, version):
    return model_store.read_metrics(store, version)


def test_version_1_published_by_two_workers(published):
    assert model_store.list_versions(published) == [1]
    assert _metrics(published, 1)["workers"] == 2


def test_workers_get_threads_for_the_cpus_they_reserve(published):
    # The module's Ray has 2 CPUs: two workers take one each (one worker both: test_training_resume.py).
    assert _metrics(published, 1)["threads_per_worker"] == 1


def test_checkpoints_stay_in_the_store_not_in_home(published):
    assert RUN in [run.name for run in (published / ".checkpoints").iterdir()]
    assert list((published / ".checkpoints" / RUN).glob("checkpoint_*/ckpt.index"))


def test_robustness_figures_are_in_metrics(published):
    metrics = _metrics(published, 1)
    assert set(metrics["robustness"]) == {*robustness.CATEGORIES, "overall"}
    assert metrics["robustness_set"]["images"] == arguments.SMOKE_ROBUSTNESS_PER_CATEGORY * len(
        robustness.CATEGORIES
    )
    assert metrics["robustness"]["overall"] > 0.5  # a smoke model reads most of them already


def test_lost_workers_resume_from_epoch_1_and_publish_once(runs, published):
    """The run lost its Ray Train workers (SIGKILL) after epoch 1's checkpoint: Ray Train started
    new ones, which went on from that checkpoint; one version, no staging left behind."""
    killed = runs["killed"]
    assert killed, "no training worker was found to kill"
    metrics = _metrics(published, 1)
    assert metrics["resumed_after_epochs"] == [1]  # resumed from epoch 1's checkpoint, not from scratch
    assert len(metrics["epoch_s"]) == EPOCHS
    assert not [p for p in published.iterdir() if p.name.startswith(".staging")]
    for pid in killed:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_gate_refuses_and_publishes_nothing(published, capsys):
    code = train.main(
        [
            "--model_path",
            str(published),
            "--smoke-test",
            "--max-train-examples",
            "1024",  # the gate is under test, not the model
            "--epochs",
            "1",
            "--init-from",
            "latest",
            "--min-accuracy",
            "0.9999",
            "--robustness-per-category",
            "5",
        ]
    )
    assert code == train.EXIT_GATE_REFUSED
    assert "below --min-accuracy" in capsys.readouterr().err
    assert model_store.list_versions(published) == [1]
    assert not [p for p in published.iterdir() if p.name.startswith(".staging")]
