"""A ``ray job submit`` training whose driver is killed after epoch 1: the same submission again
resumes it from epoch 1's checkpoint and publishes one version (workers lost mid-run:
test_training.py).

One local Ray cluster, started with ``ray start`` for its job API, is shared by the module.
"""

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from ray_app import model_store
from tests.integration.cluster import local_job_cluster
from tests.integration.training_runs import first_checkpoint_registered
from tests.polling import wait_for
from training import arguments

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's Ray, with its dashboard (the job API) on a free loopback port. Checks that no Ray
    process is left after."""
    with local_job_cluster(num_cpus=2) as cluster:
        yield cluster


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
    """The job's status once it has ended (succeeded, failed or stopped)."""
    from ray.job_submission import JobStatus

    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    wait_for(lambda: client.get_job_status(job_id) in ended, timeout_s, f"job {job_id} to end", interval_s=1)
    return client.get_job_status(job_id)


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
    client = JobSubmissionClient(ray_cluster.dashboard)
    first = _submit(client, entrypoint)

    def checkpointed() -> bool:
        assert client.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(
            first
        )
        return first_checkpoint_registered(store)

    wait_for(checkpointed, 300, "epoch 1's checkpoint", interval_s=0.5)
    resolved = arguments.resolve_run_name(run_name)
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
    metrics = model_store.read_metrics(store, 1)
    assert metrics["run_name"] == resolved
    assert metrics["resumed_after_epochs"] == [1]  # epoch 2 only was trained again, not epoch 1
    assert len(metrics["epoch_s"]) == 2
    assert metrics["workers"] == 1 and metrics["threads_per_worker"] == 2  # one worker takes both CPUs

    third = _submit(client, entrypoint)
    assert _wait_job(client, third) == JobStatus.SUCCEEDED
    assert f"Run {resolved} already published version 1; nothing to do" in client.get_job_logs(third)
    assert model_store.list_versions(store) == [1]
    assert not _drivers_of(resolved)
