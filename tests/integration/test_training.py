"""Ray Train for real: 1- and 2-worker runs publish versions that load and predict correctly; a run
resumes after a lost worker and after a lost job driver.

One local Ray cluster is shared by the module; each run uses the CLI's ``main()``.
"""

import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from tests.integration.cluster import local_job_cluster
from tests.integration.training_runs import first_checkpoint_registered
from training import model_store, robustness, train
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

# 15,000 images x 2 epochs (234 steps of 128): 96.9-97.0 % on the smoke test set, measured; well
# above what a broken distributed step or a wrong learning-rate scaling gives.
TRAIN_EXAMPLES = 15_000
EPOCHS = 2
SMOKE_ACCURACY = 0.95


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's Ray, with its dashboard (the job API) on a free loopback port; yields its address.
    Checks that no Ray process is left after."""
    with local_job_cluster(num_cpus=2) as cluster:
        yield cluster.dashboard


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("models") / "mnist"


@pytest.fixture(scope="module")
def published(ray_cluster, store):
    """Version 1 from 1 worker, version 2 from 2 workers (the 2-worker run is the real distributed path)."""
    base = ["--model_path", str(store), "--smoke-test", "--max-train-examples", str(TRAIN_EXAMPLES), "--epochs", str(EPOCHS), "--seed", "1"]  # fmt: skip
    assert train.main([*base, "--num-workers", "1"]) == 0
    # Same global batch (2 x 64) and learning rate (2 x 5e-4) as the 1-worker run, so the same
    # number of steps: batch normalisation's moving statistics need a few hundred steps.
    assert train.main([*base, "--num-workers", "2", "--batch-size", "64", "--learning-rate", "5e-4"]) == 0
    return store


def _metrics(store, version):
    return model_store.read_metrics(store, version)


def test_versions_1_and_2_published(published):
    assert model_store.list_versions(published) == [1, 2]
    assert _metrics(published, 1)["workers"] == 1
    assert _metrics(published, 2)["workers"] == 2


def test_workers_get_threads_for_the_cpus_they_reserve(published):
    # The module's Ray has 2 CPUs: one worker takes both by default, two workers one each.
    assert _metrics(published, 1)["threads_per_worker"] == 2
    assert _metrics(published, 2)["threads_per_worker"] == 1


def test_checkpoints_stay_in_the_store_not_in_home(published):
    runs = sorted((published / ".checkpoints").iterdir())
    assert len(runs) >= 2 and all(run.name.startswith("mnist-") for run in runs)
    assert list(runs[0].glob("checkpoint_*/ckpt.index"))


def test_robustness_figures_are_in_metrics(published):
    metrics = _metrics(published, 1)
    assert set(metrics["robustness"]) == {*robustness.CATEGORIES, "overall"}
    assert metrics["robustness_set"]["images"] == train.SMOKE_ROBUSTNESS_PER_CATEGORY * len(
        robustness.CATEGORIES
    )
    assert metrics["robustness"]["overall"] > 0.5  # a smoke model reads most of them already


def test_two_workers_match_one_worker_and_do_not_stall(published):
    one, two = _metrics(published, 1), _metrics(published, 2)
    assert one["test_accuracy"] >= SMOKE_ACCURACY
    assert two["test_accuracy"] >= SMOKE_ACCURACY
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.015  # same within noise
    for metrics in (one, two):
        assert len(metrics["epoch_s"]) == EPOCHS
        # A tf.data destructor stall shows up as a multi-second epoch on this small run.
        assert max(metrics["epoch_s"]) < 4 * min(metrics["epoch_s"]) + 5, metrics["epoch_s"]


@pytest.mark.parametrize("version", [1, 2])
def test_both_signatures_predict_real_test_digits(published, version):
    test = load_mnist().test
    images, labels = test.images[-500:], test.labels[-500:]  # digits the smoke run never evaluated on
    loaded = tf.saved_model.load(str(model_store.version_path(published, version)))
    assert {"serving_default", "predict_images"} <= set(loaded.signatures)

    default = loaded.signatures["serving_default"](images=tf.constant(images))
    assert default["probabilities"].shape == (500, 10) and default["classes"].dtype == tf.int64
    np.testing.assert_allclose(default["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(default["classes"].numpy() == labels) >= 0.95

    flat = tf.constant(images.reshape(-1, 784).astype(np.float32) / 255.0)
    scores = loaded.signatures["predict_images"](images=flat)["scores"].numpy()
    np.testing.assert_array_equal(np.argmax(scores, axis=1), default["classes"].numpy())


def test_metrics_and_warmup_records_are_parseable(published):
    version_dir = model_store.version_path(published, 2)
    metrics = json.loads((version_dir / "assets.extra" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs", "workers", "data_source", "git_commit", "created_at"):
        assert key in metrics
    records = list(tf.data.TFRecordDataset(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")))
    assert records
    signatures = set()
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        assert log.HasField("predict_log")
        signatures.add(log.predict_log.request.model_spec.signature_name)
        assert "images" in log.predict_log.request.inputs
    assert signatures == {"serving_default", "predict_images"}


def test_gate_refuses_and_publishes_nothing(published, capsys):
    code = train.main(
        [
            "--model_path",
            str(published),
            "--smoke-test",
            "--max-train-examples",
            "6400",  # the gate is under test, not the model
            "--epochs",
            "1",
            "--init-from",
            "latest",
            "--min-accuracy",
            "0.9999",
        ]
    )
    assert code == train.EXIT_GATE_REFUSED
    assert "below --min-accuracy" in capsys.readouterr().err
    assert model_store.list_versions(published) == [1, 2]
    assert not [p for p in published.iterdir() if p.name.startswith(".staging")]


def _kill_train_workers_after_the_first_checkpoint(store, killed: list, stop: threading.Event) -> None:
    """SIGKILL the Ray Train workers of this test's own cluster once epoch 1's checkpoint is registered.

    Only this test process's descendants are candidates (other people's Ray clusters are never
    touched); idle workers left by earlier runs of the module may go too, harmlessly.
    """
    while not stop.is_set():
        if first_checkpoint_registered(store):
            for process in psutil.Process().children(recursive=True):
                try:
                    if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                        process.send_signal(signal.SIGKILL)
                        killed.append(process.pid)
                except psutil.Error:
                    continue
            if killed:
                return
        time.sleep(0.2)


def test_worker_killed_after_first_epoch_resumes_and_publishes_once(ray_cluster, tmp_path):
    store = tmp_path / "mnist"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_train_workers_after_the_first_checkpoint, args=(store, killed, stop), daemon=True
    )
    killer.start()
    try:
        code = train.main(
            ["--model_path", str(store), "--smoke-test", "--max-train-examples", "8192", "--epochs", "2",
             "--seed", "3", "--robustness-per-category", "5"]
        )  # fmt: skip
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert code == 0
    assert model_store.list_versions(store) == [1]
    assert not [p for p in store.iterdir() if p.name.startswith(".staging")]
    metrics = _metrics(store, 1)
    assert metrics["resumed_after_epochs"] == [1]  # resumed from epoch 1's checkpoint, not from scratch
    assert len(metrics["epoch_s"]) == 2
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE


def _drivers_of(run_name: str) -> list[psutil.Process]:
    """The job driver processes (``python training/train.py ... --run-name <run_name>``) of this test
    (children of the cluster's job agent, not of this process: ``ray start`` detaches the cluster)."""
    found = []
    for process in psutil.process_iter():
        try:
            argv = process.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("training/train.py") for a in argv) and run_name in argv:
            found.append(process)
    return found


def _submit(client, entrypoint: str, timeout_s: float = 120) -> str:
    """``submit_job``, again while the node's job agent is not up yet (Ray answers 500 "No available
    agent to submit job, please try again later" for a while after ``ray.init`` starts the dashboard)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _wait_job(client, job_id: str, timeout_s: float = 600):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(1)
    return status


def test_a_job_whose_driver_is_killed_resumes_when_submitted_again_and_publishes_once(ray_cluster, tmp_path):
    """``ray job submit`` the training command; SIGKILL its driver once epoch 1's checkpoint is
    registered; submit the very same command again: it resumes after epoch 1 (the run name finds
    the run's checkpoints) and publishes one version. A third submission publishes nothing."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    store = tmp_path / "mnist"
    run_name = "resume-test"
    entrypoint = (
        f"{sys.executable} {REPO / 'training' / 'train.py'} --model_path {store} --smoke-test "
        f"--max-train-examples 8192 --epochs 2 --seed 5 --robustness-per-category 5 --run-name {run_name}"
    )
    client = JobSubmissionClient(ray_cluster)
    first = _submit(client, entrypoint)
    deadline = time.monotonic() + 300
    while not first_checkpoint_registered(store):
        assert client.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(
            first
        )
        assert time.monotonic() < deadline, "no epoch checkpoint within 300 s"
        time.sleep(0.5)
    resolved = train.resolve_run_name(run_name)
    drivers = _drivers_of(resolved)
    assert len(drivers) == 1, drivers
    drivers[0].send_signal(signal.SIGKILL)
    assert _wait_job(client, first) == JobStatus.FAILED
    assert model_store.list_versions(store) == []

    second = _submit(client, entrypoint)
    assert _wait_job(client, second) == JobStatus.SUCCEEDED, client.get_job_logs(second)
    logs = client.get_job_logs(second)
    assert "(resuming this run from its latest checkpoint)" in logs
    assert model_store.list_versions(store) == [1]
    metrics = _metrics(store, 1)
    assert metrics["run_name"] == resolved
    assert metrics["resumed_after_epochs"] == [1]  # epoch 2 only was trained again, not epoch 1
    assert len(metrics["epoch_s"]) == 2

    third = _submit(client, entrypoint)
    assert _wait_job(client, third) == JobStatus.SUCCEEDED
    assert f"Run {resolved} already published version 1; nothing to do" in client.get_job_logs(third)
    assert model_store.list_versions(store) == [1]
    assert not _drivers_of(resolved)
