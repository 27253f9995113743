"""End to end: the README's main command (client/pipeline.py) on a real local Ray, with real tools.

The pipeline runs ``ray start``, two ``ray job submit`` trainings (smaller: --smoke-test),
``serve deploy``, the client, and is asked to leave the app running so the documentation's own
serving commands (the tutorial, docs/tutorial/local-journey.md) can be run against it verbatim; the
module then stops everything with the tutorial's clean-up commands and checks nothing of Ray is left.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.local import leftovers
from client.local.ports import free_port, port_in_use
from client.pipeline import DASHBOARD_PORT, default_ports, running_ray_processes
from ray_app import model_store
from ray_app.front_door import HAPROXY_HARD_STOP_AFTER_S
from tests import doc_blocks

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]  # its clean-up is `ray stop`

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
SAMPLES = json.loads((REPO / "data" / "samples.json").read_text())
# Where the pipeline's HAProxy keeps its state (client.local.leftovers.new_state_dir).
HAPROXY_STATE_PREFIX = f"/tmp/{leftovers.STATE_DIR_PREFIX}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python`, `ray`, `serve` of this venv
    env["RAY_AUTH_MODE"] = "token"
    return env


def _blocks(marker: str) -> list[tuple[str, str]]:
    """(language, code) of every checked block (README.md or docs/) after ``<!-- readme-check: marker -->``."""
    return doc_blocks.blocks(marker)


def _cleanup_commands(dashboard: str) -> list[str]:
    """What the pipeline runs at the end (without --keep-running); this module runs them itself."""
    return [f"serve shutdown -y --address {dashboard}", "ray stop"]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    deadline = time.monotonic() + 60  # earlier modules' ray.shutdown() may still be finishing
    while running_ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not running_ray_processes(), f"a Ray cluster is already running: {running_ray_processes()}"
    defaults = (*default_ports(), DASHBOARD_PORT)
    default_ports_free = not any(port_in_use(port) for port in defaults)
    grpc_port, http_port = default_ports() if default_ports_free else (free_port(), free_port())
    run_dir = tmp_path_factory.mktemp("journey") / "run"
    argv = [
        sys.executable, "client/pipeline.py", "--smoke-test", "--epochs", "2", "--epochs-v2", "1",
        "--run-dir", str(run_dir), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--keep-running", "--step-timeout-s", "600",
    ]  # fmt: skip
    dashboard = None
    try:
        # Every step of the pipeline has its own limit; this one only guards against a hang.
        result = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=2400)
        print(result.stdout[-6000:], result.stderr[-4000:])
        dashboard = re.search(r"dashboard\s+(http://127\.0\.0\.1:\d+)", result.stdout)
        yield {
            "result": result,
            "run_dir": run_dir,
            "default_ports": default_ports_free,
            "dashboard": dashboard.group(1) if dashboard else None,
        }
    finally:
        # The README's clean-up commands (its step-by-step block ends with them).
        address = dashboard.group(1) if dashboard else f"http://127.0.0.1:{DASHBOARD_PORT}"
        for command in _cleanup_commands(address):
            subprocess.run(shlex.split(command), env=_env(), capture_output=True, timeout=120)
        left = leftovers.wait_gone(leftovers.ray_processes, timeout_s=30)
        # A stopping HAProxy finishes what is in flight first: it is gone by hard-stop-after at the latest.
        haproxy = leftovers.wait_gone(
            lambda: leftovers.haproxy_processes(HAPROXY_STATE_PREFIX),
            timeout_s=HAPROXY_HARD_STOP_AFTER_S + 15,
        )
        leftovers.stop(left + haproxy)  # so a failure here does not cascade into later tests
        assert not left, f"ray stop left Ray processes behind: {leftovers.describe(left)}"
        assert not haproxy, f"HAProxy left behind: {leftovers.describe(haproxy)}"
        busy = [port for port in (grpc_port, http_port) if port_in_use(port)]
        assert not busy, f"serving ports still bound after the clean-up: {busy}"


def test_pipeline_publishes_two_versions_and_the_client_reads_the_samples(journey):
    result = journey["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    steps = re.findall(r"^==> \[(\d)/7\]", out, flags=re.M)
    assert steps == [str(i) for i in range(1, 8)]
    # the README's client command, with the seed's exact output format
    assert re.search(
        r"^      Predicted Digit:  0\n      Predicted Confidence:  (?:0\.9\d{3}|1\.0000)$", out, re.M
    )
    expected = " ".join(str(SAMPLES[f"{i}.png"]) for i in range(10))
    assert re.search(rf"answers v1\s+{expected}  \(10/10 sample digits correct\)", out)
    assert re.search(rf"answers v2\s+{expected}  \(10/10 sample digits correct\)", out)
    probe = re.search(r"while retraining\s+(\d+) requests, (\d+) failed, answered by versions (.*)", out)
    assert probe and int(probe.group(1)) > 0 and probe.group(2) == "0"
    assert re.match(r"1 \(\d+x\)", probe.group(3))  # version 1 answered while version 2 was trained
    store = journey["run_dir"] / "models" / "mnist"
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["1", "2"]
    v2 = json.loads((store / "2" / "assets.extra" / "metrics.json").read_text())
    assert v2["init_from"] and v2["init_from"].endswith("/1") and v2["workers"] == 2
    assert v2["test_accuracy"] >= 0.95


def test_version_1_from_two_workers_learned_and_answers_in_both_signatures(journey):
    """What the journey's first training published (2 epochs of the smoke set on 2 Ray Train
    workers): learned well above what a broken distributed step or a wrong learning-rate scaling
    gives, no stalled epoch, both signatures answering alike on digits it never saw, and TF
    Serving's warm-up records readable."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from training.data import load_mnist

    store = journey["run_dir"] / "models" / "mnist"
    metrics = model_store.read_metrics(store, 1)
    assert metrics["workers"] == 2 and metrics["test_accuracy"] >= 0.95
    assert len(metrics["epoch_s"]) == 2
    # A tf.data destructor stall shows up as a multi-second epoch on this small run.
    assert max(metrics["epoch_s"]) < 4 * min(metrics["epoch_s"]) + 5, metrics["epoch_s"]

    test = load_mnist().test
    images, labels = test.images[-500:], test.labels[-500:]  # the smoke run evaluated the first 2,000
    version_dir = model_store.version_path(store, 1)
    loaded = tf.saved_model.load(str(version_dir))
    assert {"serving_default", "predict_images"} <= set(loaded.signatures)
    default = loaded.signatures["serving_default"](images=tf.constant(images))
    assert default["probabilities"].shape == (500, 10) and default["classes"].dtype == tf.int64
    np.testing.assert_allclose(default["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(default["classes"].numpy() == labels) >= 0.95
    flat = tf.constant(images.reshape(-1, 784).astype(np.float32) / 255.0)
    scores = loaded.signatures["predict_images"](images=flat)["scores"].numpy()
    np.testing.assert_array_equal(np.argmax(scores, axis=1), default["classes"].numpy())

    records = list(tf.data.TFRecordDataset(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")))
    signatures = set()
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        assert log.HasField("predict_log") and "images" in log.predict_log.request.inputs
        signatures.add(log.predict_log.request.model_spec.signature_name)
    assert signatures == {"serving_default", "predict_images"}


def _shape(command: str) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...], frozenset[str]]:
    """(leading words, flags, entrypoint words, entrypoint flags) of a command line."""
    words = shlex.split(command.split("    (")[0], comments=True)
    if "--" in words:
        head, entry = words[: words.index("--")], words[words.index("--") + 1 :]
    else:
        head, entry = words, []

    def split(tokens: list[str]) -> tuple[tuple[str, ...], frozenset[str]]:
        leading = []
        for token in tokens:
            if token.startswith("-"):
                break
            leading.append(token)
        return tuple(leading), frozenset(t for t in tokens if t.startswith("-"))

    lead, flags = split(head)
    entry_lead, entry_flags = split(entry)
    return lead, flags, entry_lead, entry_flags


# Flags only the pipeline passes: its run's own checkpoint directory and the test's smaller
# training (train.py), and Ray's default ports where something else holds them (ray start).
_PIPELINE_ONLY_TRAIN = frozenset({"--storage-path", "--smoke-test"})
_PIPELINE_ONLY_RAY_START = frozenset(
    {"--port", "--dashboard-port", "--dashboard-agent-listen-port", "--ray-client-server-port"}
)


def test_readme_step_by_step_block_is_what_the_pipeline_ran(journey):
    ((language, block),) = _blocks("pipeline-steps")
    readme = [
        line
        for line in block.splitlines()
        if line.strip() and not line.startswith(("source ", "export ", "eval ", "#"))
    ]
    ran = []
    for line in journey["result"].stdout.splitlines():
        if line.startswith("    $ ") and (not ran or ran[-1] != line[6:]):
            ran.append(line[6:])  # a command repeated while waiting counts once
    ran += _cleanup_commands(journey["dashboard"])  # --keep-running left these to the fixture
    assert len(readme) == len(ran), (readme, ran)
    for documented, executed in zip(readme, ran):
        lead, flags, entry_lead, entry_flags = _shape(documented)
        run_lead, run_flags, run_entry_lead, run_entry_flags = _shape(executed)
        if journey["default_ports"]:
            assert lead == run_lead, (documented, executed)  # also the config file: serve_configs/local.yaml
        else:
            assert lead[:2] == run_lead[:2], (documented, executed)
        only = _PIPELINE_ONLY_RAY_START if lead[:2] == ("ray", "start") else frozenset()
        assert flags == run_flags - only, (documented, executed)
        assert (entry_lead, entry_flags) == (run_entry_lead, run_entry_flags - _PIPELINE_ONLY_TRAIN)


def test_readme_serving_commands_run_against_the_app(journey):
    if not journey["default_ports"]:
        pytest.skip("ports 9000/8000/8265 were taken, so the app runs on other ports than the README's")
    blocks = _blocks("run-against-app")
    assert [language for language, _ in blocks] == ["bash", "python", "bash"]
    for language, code in blocks:
        if language == "python":
            argv = [sys.executable, "-c", code]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (code, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert '"error"' not in result.stdout, result.stdout
        if language == "python":
            assert result.stdout.split()[-1] in ("1", "2")  # the version that answered
        elif "grpc_client" in code:
            assert "Predicted Digit:  0\nPredicted Confidence:  " in result.stdout
            assert "10/10 correct" in result.stdout
            assert (
                "exit 7: no such label" in result.stdout
            )  # TF Serving: an unknown label is INVALID_ARGUMENT
        else:
            assert '"model_version_status"' in result.stdout and '"predictions"' in result.stdout


def test_readme_set_up_commands_are_what_ci_runs():
    commands = re.findall(
        r"```bash\n((?:\(command -v chromedriver .*?\)\) && )?python3 -m venv .venv && [^\n]+)\n```", README
    )
    assert len(commands) == 2, commands
    main, tests = commands
    assert main.endswith(".venv/bin/python client/pipeline.py")  # what the journey fixture runs
    # Two processes: the journey (its clean-up stops every Ray on the machine) beside the unit tests
    # (which start none), then the other integration modules, one per process at a time.
    assert tests.endswith(
        '.venv/bin/pytest -q -n 2 --dist loadfile -m "serial or not integration" '
        '&& .venv/bin/pytest -q -n 2 --dist loadfile -m "integration and not serial"'
    )
    assert (
        "apt-get install -y -qq --no-install-recommends chromium chromium-driver redis-server" in tests
    )  # the browser test, the head-failure test
    install = tests[tests.index("python3 -m venv") :]
    # The same install; the journey needs the serving and training extras, the tests also their tools.
    assert main.rsplit(" && ", 1)[0] == install.split(" && .venv/bin/ruff", 1)[0].replace(".[dev]", ".[all]")
    assert ".venv/bin/ruff check . && .venv/bin/ruff format --check ." in tests  # lint before the tests
    assert tests in (REPO / ".ci" / "run").read_text()


def test_readme_retention_command_protects_what_the_app_serves(journey):
    if not journey["default_ports"]:
        pytest.skip("ports 9000/8000/8265 were taken, so the app runs on other ports than the README's")
    ((language, code),) = _blocks("retention")
    store = journey["run_dir"] / "models" / "mnist"
    command = code.replace("--model_path models/mnist", f"--model_path {store}")
    assert command != code and "--dry-run" in command
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr)
    # --keep 1, but the app has both versions loaded (local.yaml: num_versions 2): both stay.
    assert "loaded by http://127.0.0.1:8000" in result.stdout
    assert "would remove versions none" in result.stdout
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["1", "2"]
