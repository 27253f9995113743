"""The training CLI's argument handling and gates (no Ray, no training)."""

import argparse

import pytest

from training import train


def _args(*argv: str) -> argparse.Namespace:
    return train.build_parser().parse_args(list(argv))


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


def test_corrupt_data_dir_fails_before_ray(tmp_path, capsys):
    assert train.main(["--model_path", str(tmp_path / "m"), "--data-dir", str(tmp_path)]) == train.EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err


def test_smoke_flag_limits_the_data(tmp_path):
    config = train.config_from_args(
        _args("--model_path", str(tmp_path), "--smoke-test", "--num-workers", "2")
    )
    assert config.max_train_examples == train.SMOKE_TRAIN_EXAMPLES
    assert config.num_workers == 2


@pytest.mark.parametrize(
    ("argv", "accuracy", "latest", "refused"),
    [
        ((), 0.5, None, None),
        (("--min-accuracy", "0.99"), 0.98, None, "below --min-accuracy"),
        (("--min-accuracy", "0.99"), 0.995, None, None),
        (("--must-beat-latest",), 0.99, 0.99, "does not beat"),
        (("--must-beat-latest",), 0.991, 0.99, None),
        (("--must-beat-latest",), 0.9, None, None),  # nothing published yet
    ],
)
def test_gate(tmp_path, argv, accuracy, latest, refused):
    reason = train.gate(accuracy, _args("--model_path", str(tmp_path), *argv), latest)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason
