"""The training CLI's argument handling and gates (no Ray, no training)."""

import argparse

import pytest

from ray_app import model_store
from training import arguments, gate, publish, robustness, run, train


def _args(*argv: str) -> argparse.Namespace:
    return arguments.build_parser().parse_args(list(argv))


def test_existing_version_fails_before_training(tmp_path, capsys):
    (tmp_path / "3").mkdir()
    assert train.main(["--model_path", str(tmp_path), "--version", "3"]) == train.EXIT_VERSION_EXISTS
    assert "version 3 already exists" in capsys.readouterr().err


def test_init_from_latest_needs_a_version(tmp_path, capsys):
    assert train.main(["--model_path", str(tmp_path), "--init-from", "latest"]) == train.EXIT_USAGE
    assert "no published version" in capsys.readouterr().err
    assert train.main(["--model_path", str(tmp_path), "--init-from", "best"]) == train.EXIT_USAGE


def test_bad_numbers_are_usage_errors(tmp_path, capsys):
    assert train.main(["--model_path", str(tmp_path), "--epochs", "0"]) == train.EXIT_USAGE
    assert "epochs must be >= 1" in capsys.readouterr().err
    assert train.main(["--model_path", str(tmp_path), "--min-accuracy", "99"]) == train.EXIT_USAGE
    capsys.readouterr()
    assert train.main(["--model_path", str(tmp_path), "--max-train-examples", "100"]) == train.EXIT_USAGE
    assert "at least one global batch (128)" in capsys.readouterr().err


def test_corrupt_data_dir_fails_before_ray(tmp_path, capsys):
    assert train.main(["--model_path", str(tmp_path / "m"), "--data-dir", str(tmp_path)]) == train.EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err


def test_smoke_flag_limits_the_data(tmp_path):
    config = arguments.config_from_args(
        _args("--model_path", str(tmp_path), "--smoke-test", "--num-workers", "2")
    )
    assert config.max_train_examples == arguments.SMOKE_TRAIN_EXAMPLES
    assert config.num_workers == 2


@pytest.mark.parametrize(
    ("argv", "scores", "latest", "refused"),
    [
        ((), (0.5, 0.5), None, None),
        (("--min-accuracy", "0.99"), (0.98, 0.99), None, "below --min-accuracy"),
        (("--min-accuracy", "0.99"), (0.995, 0.5), None, None),
        (("--must-beat-latest",), (0.99, 0.97), (0.99, 0.97), "does not beat"),
        (("--must-beat-latest",), (0.991, 0.97), (0.99, 0.97), None),
        (("--must-beat-latest",), (0.991, 0.969), (0.99, 0.97), "robustness-set accuracy 0.9690 is below"),
        (("--must-beat-latest",), (0.991, 0.98), (0.99, 0.97), None),
        (("--must-beat-latest",), (0.9, 0.1), None, None),  # nothing published yet
    ],
)
def test_gate(tmp_path, argv, scores, latest, refused):
    latest_scores = gate.Scores(*latest) if latest else None
    reason = gate.gate(gate.Scores(*scores), _args("--model_path", str(tmp_path), *argv), latest_scores)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason


def test_checkpoints_default_to_a_hidden_directory_in_the_store(tmp_path):
    args = _args("--model_path", str(tmp_path / "mnist"))
    assert run.checkpoint_storage(args) == str((tmp_path / "mnist" / ".checkpoints").resolve())
    args = _args("--model_path", str(tmp_path / "mnist"), "--storage-path", "s3://bucket/runs")
    assert run.checkpoint_storage(args) == "s3://bucket/runs"


def test_the_store_ignores_the_checkpoints_directory(tmp_path):
    store = tmp_path / "mnist"
    (store / ".checkpoints" / "mnist-20261130-120000" / "checkpoint_0").mkdir(parents=True)
    (store / "1").mkdir()
    (store / "1" / "saved_model.pb").write_bytes(b"")
    assert model_store.list_versions(store) == [1]
    assert model_store.next_version(store) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--robustness-per-category", "0"), "--robustness-per-category must be >= 1"),
        (("--cpus-per-worker", "0"), "--cpus-per-worker must be > 0"),
    ],
)
def test_more_bad_numbers(tmp_path, capsys, argv, message):
    assert train.main(["--model_path", str(tmp_path), *argv]) == train.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_smoke_test_uses_a_small_robustness_set(tmp_path):
    args = _args("--model_path", str(tmp_path), "--smoke-test")
    assert (
        gate.robustness_per_category(arguments.config_from_args(args), args)
        == arguments.SMOKE_ROBUSTNESS_PER_CATEGORY
    )
    args = _args("--model_path", str(tmp_path))
    assert (
        gate.robustness_per_category(arguments.config_from_args(args), args)
        == robustness.DEFAULT_PER_CATEGORY
    )
    args = _args("--model_path", str(tmp_path), "--smoke-test", "--robustness-per-category", "7")
    assert gate.robustness_per_category(arguments.config_from_args(args), args) == 7


def test_init_from_a_version_of_another_architecture_is_refused(tmp_path, capsys):
    version = tmp_path / "1"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets.extra" / "metrics.json").write_text('{"architecture": "cnn-32-64-128-v1"}')
    assert train.main(["--model_path", str(tmp_path), "--init-from", "latest"]) == train.EXIT_USAGE
    assert "version 1 is a cnn-32-64-128-v1 network" in capsys.readouterr().err


def test_batch_norm_momentum_settles_short_runs_and_keeps_the_default_run():
    from training.model import DEFAULT_BN_MOMENTUM, bn_momentum_for

    assert bn_momentum_for(469 * 12) == DEFAULT_BN_MOMENTUM == 0.99  # the measured default run
    assert abs(bn_momentum_for(234) - (1 - 10 / 234)) < 1e-12  # a 2-worker smoke run
    assert 0.5 <= bn_momentum_for(1) < bn_momentum_for(100) < 0.99


def test_run_name_fills_in_the_date_and_refuses_unsafe_names():
    import datetime as dt

    now = dt.datetime(2026, 12, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert arguments.resolve_run_name(arguments.DEFAULT_RUN_NAME, now) == "mnist-20261202-030405"
    assert arguments.resolve_run_name("finetune-%Y%m%d", now) == "finetune-20261202"
    for bad in ("../elsewhere", "a/b", "", ".hidden", "x" * 129):
        with pytest.raises(arguments.UsageError):
            arguments.resolve_run_name(bad, now)


def test_a_run_that_already_published_publishes_nothing_again(tmp_path, capsys):
    version = tmp_path / "4"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    (version / "assets.extra" / "metrics.json").write_text('{"run_name": "nightly-20261202"}')
    # Returns before Ray starts (the unit tests' fixture fails any ray.init) and publishes nothing.
    assert train.main(["--model_path", str(tmp_path), "--run-name", "nightly-20261202"]) == 0
    assert "Run nightly-20261202 already published version 4; nothing to do" in capsys.readouterr().out
    assert model_store.list_versions(tmp_path) == [4]
    assert publish.published_by_run(str(tmp_path), "nightly-20261203") is None


def test_retention_flags_are_checked_before_training(tmp_path, capsys):
    assert train.main(["--model_path", str(tmp_path), "--keep-versions", "0"]) == train.EXIT_USAGE
    assert "--keep-versions must be >= 1" in capsys.readouterr().err
    assert train.main(["--model_path", str(tmp_path), "--protect-from", "x.yaml"]) == train.EXIT_USAGE
    assert "--protect-from needs --keep-versions" in capsys.readouterr().err


def test_a_signing_key_that_cannot_be_used_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "run_training", lambda *a: pytest.fail("training started"))
    missing = tmp_path / "absent.pem"
    assert train.main(["--model_path", str(tmp_path), "--signing-key", str(missing)]) == train.EXIT_USAGE
    assert "--signing-key" in capsys.readouterr().err
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("MNIST_SIGNING_KEY", str(not_a_key))
    assert train.main(["--model_path", str(tmp_path)]) == train.EXIT_USAGE
