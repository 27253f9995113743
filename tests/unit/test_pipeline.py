"""client/pipeline.py's own logic, without Ray: what it echoes, refuses and reports."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from client import pipeline
from client.local.ports import free_port
from client.pipeline import Journey, PipelineConfig, _worth_echoing, parse_args, summary


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("\x1b[36m(RayTrainWorker pid=5101)\x1b[0m [rank 0] epoch 1/3: loss 0.12", ("epoch 1", "[rank 0] epoch 1/3: loss 0.12")),
        ("(RayTrainWorker pid=7, ip=10.0.0.2) [rank 1] epoch 2/3: x [repeated 2x across cluster]", ("epoch 2", "[rank 1] epoch 2/3: x")),
        ("2026-11-25 02:15:41,864\tSUCC cli.py:67 -- \x1b[32mJob 'raysubmit_Y' succeeded\x1b[39m", ("Job 'raysubmit_Y' succeeded",) * 2),
        ("Published version 2 of mnist at /m/2 (test accuracy 0.99)", ("Published version 2 of mnist at /m/2 (test accuracy 0.99)",) * 2),
        ("error: training failed: boom", ("error: training failed: boom",) * 2),
        ("E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: x", None),
        ("(RayTrainWorker pid=1) [rank 0] resumed after epoch 1", None),
        ("epoch 3/12: loss 0.0400 acc 0.9870 test_acc 0.9931 20.1s (2990 img/s)", ("epoch 3", "epoch 3/12: loss 0.0400 acc 0.9870 test_acc 0.9931 20.1s (2990 img/s)")),
        ("warning: a training worker failed; resumed from the checkpoint of epoch 1", ("warning: a training worker failed; resumed from the checkpoint of epoch 1",) * 2),
        ("Training finished in 250.1s: 12 epoch(s), test accuracy 0.9961 after the last one", ("Training finished in 250.1s: 12 epoch(s), test accuracy 0.9961 after the last one",) * 2),
        ("I0000 00:00:1796060556.805378   19085 port.cc:153] oneDNN custom operations are on.", None),
        ("2026-11-30 17:42:43,672\tINFO worker.py:2029 -- Started a local Ray instance.", None),
    ],
)  # fmt: skip
def test_worth_echoing(line: str, shown: tuple[str, str] | None) -> None:
    assert _worth_echoing(line) == shown


def test_commands_are_shown_as_a_user_types_them(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    shown = Journey._display(
        [str(bin_dir / "ray"), "job", "submit", "--working-dir", str(pipeline.REPO), "--", sys.executable,
         str(pipeline.REPO / "serve_configs" / "local.yaml"), str(tmp_path)]
    )  # fmt: skip
    assert shown == [
        "ray",
        "job",
        "submit",
        "--working-dir",
        ".",
        "--",
        "python",
        "serve_configs/local.yaml",
        str(tmp_path),
    ]


def test_refuses_to_start_beside_another_ray_cluster(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(pipeline, "running_ray_processes", lambda: ["gcs_server (123)"])
    assert pipeline.run(PipelineConfig(run_dir=tmp_path / "run")) == 2
    assert "a Ray cluster is already running on this machine (gcs_server (123))" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_refuses_busy_serving_ports(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(pipeline, "running_ray_processes", lambda: [])
    monkeypatch.setattr(pipeline, "port_in_use", lambda port: port == 9000)
    assert pipeline.run(PipelineConfig(run_dir=tmp_path / "run")) == 2
    assert "port 9000 is in use; pass --grpc-port/--http-port" in capsys.readouterr().err


def test_command_line_checks(tmp_path: Path, capsys) -> None:
    config = parse_args(["--run-dir", str(tmp_path / "new"), "--epochs", "2", "--smoke-test"])
    assert (config.epochs_v1, config.smoke_test, config.store) == (
        2,
        True,
        tmp_path / "new" / "models" / "mnist",
    )
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    for argv in (["--run-dir", str(tmp_path / "used")], ["--epochs", "0"], ["--num-workers", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2
    assert "is not empty" in capsys.readouterr().err


def test_summary_reports_versions_answers_and_the_probe(tmp_path: Path) -> None:
    journey = Journey(PipelineConfig(run_dir=tmp_path))
    journey.report.dashboard = "http://127.0.0.1:8265"
    journey.report.versions = {
        1: {"test_accuracy": 0.9912, "test_examples": 10000, "epochs": 3, "workers": 2, "train_wall_s": 95.1}
    }
    journey.report.answers = {1: [{"digit": 7, "correct": True}, {"digit": 3, "correct": False}]}
    journey.report.probe = {"requests": 40, "failed": 0, "versions": "1 (30x), 2 (10x)"}
    text = summary(journey, ok=False)
    assert "Summary (FAILED)" in text
    assert (
        "version 1         test accuracy 99.12 % on 10000 images, 3 epoch(s), 2 Ray Train workers, 95.1 s"
        in text
    )
    assert "answers v1        7 3  (1/2 sample digits correct)" in text
    assert "while retraining  40 requests, 0 failed, answered by versions 1 (30x), 2 (10x)" in text
    assert "http://127.0.0.1:8265 (stopped)" in text


def test_a_step_that_outlives_its_limit_is_killed_and_named(tmp_path: Path) -> None:
    journey = Journey(PipelineConfig(run_dir=tmp_path))
    journey.kill_grace_s = 1.0
    started = time.monotonic()
    with pytest.raises(
        pipeline.StepFailed, match=r"^slow-step timed out after 0.5 s; last lines of .*slow-step.log"
    ):
        journey._run("slow-step", ["bash", "-c", "echo started; trap '' TERM; sleep 60"], timeout_s=0.5)
    assert time.monotonic() - started < 10  # SIGTERM ignored: SIGKILL followed after the grace period


def test_an_unplanned_error_is_one_line_and_still_cleans_up(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(pipeline, "running_ray_processes", lambda: [])
    monkeypatch.setattr(pipeline, "port_in_use", lambda port: False)
    cleaned = []

    def broken_start(self) -> None:
        self.started_ray = True
        raise ValueError("metrics.json is not JSON")

    monkeypatch.setattr(Journey, "start_ray", broken_start)
    monkeypatch.setattr(Journey, "shutdown", lambda self: cleaned.append(self.started_ray))
    assert pipeline.run(PipelineConfig(run_dir=tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ValueError: metrics.json is not JSON (logs: ") and err.count("\n") == 1
    assert cleaned == [True]


def _fake_ray_tool(tmp_path: Path) -> Path:
    """A `ray` stand-in whose `get-auth-token --generate` behaves like Ray's (create if missing, print it)."""
    script = tmp_path / "bin" / "ray"
    script.parent.mkdir()
    script.write_text(
        "#!/usr/bin/env bash\n"
        'token="$HOME/.ray/auth_token"\n'
        '[ "$1 $2" = "get-auth-token --generate" ] || exit 9\n'
        'if [ ! -s "$token" ]; then mkdir -p "$HOME/.ray"; echo "Generating new authentication token..." >&2;'
        ' printf secret-new > "$token"; fi\n'
        'cat "$token"\n'
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("had_token", [False, True])
def test_a_fresh_home_gets_a_token_and_an_existing_one_is_kept(
    tmp_path, monkeypatch, capsys, had_token
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    if had_token:
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text("secret-old")
    journey = Journey(PipelineConfig(run_dir=tmp_path / "run"))
    journey.env.update(HOME=str(home))
    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        journey.env.pop(variable, None)
    tool = _fake_ray_tool(tmp_path)
    monkeypatch.setattr(Journey, "_tool", lambda self, name: str(tool))
    journey.ensure_token()
    out = capsys.readouterr().out
    token = (home / ".ray" / "auth_token").read_text()
    assert token == ("secret-old" if had_token else "secret-new")  # never overwritten
    assert "get-auth-token --generate >/dev/null" in out
    if had_token:
        assert f"using the existing Ray token ({home / '.ray' / 'auth_token'})" in out
    else:
        assert f"created a Ray token at {home / '.ray' / 'auth_token'} (none existed)" in out
    log = (tmp_path / "run" / "logs" / "1-auth-token.log").read_text()
    assert "secret" not in out + log  # the token is a secret: neither shown nor logged


def test_token_sources_in_the_order_ray_reads_them(tmp_path: Path) -> None:
    from client.pipeline import existing_token_source

    custom = tmp_path / "token"
    assert existing_token_source({"HOME": str(tmp_path)}) is None
    assert existing_token_source({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(custom)}) is None
    custom.write_text("abc")
    assert existing_token_source({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(custom)}) == (
        f"RAY_AUTH_TOKEN_PATH={custom}"
    )
    assert existing_token_source({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "x"}) == "RAY_AUTH_TOKEN"


def test_clean_up_stops_and_reports_what_is_left_running(tmp_path, capsys) -> None:
    import subprocess as sp

    import psutil

    journey = Journey(PipelineConfig(run_dir=tmp_path, grpc_port=free_port(), http_port=free_port()))
    journey.leftover_grace_s = 1.0
    journey.started_ray = True
    straggler = sp.Popen(["sleep", "60"])
    try:
        journey.check_nothing_left([psutil.Process(straggler.pid)])
        assert straggler.wait(timeout=10) is not None  # stopped
    finally:
        if straggler.poll() is None:
            straggler.kill()
    out = capsys.readouterr().out
    assert f"warning: stopping what clean-up left running: sleep ({straggler.pid})" in out
    assert "nothing left running" in out  # ports free afterwards
