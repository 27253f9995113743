"""Retention of the model store (training/retention.py): what goes, what stays and why (no Ray)."""

import http.server
import json
import os
import threading
import time

import pytest
import yaml

from ray_app import model_store
from training import retention


def _version(store, version: int) -> None:
    path = store / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph")


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "mnist"
    for version in range(1, 8):
        _version(path, version)
    return path


def _config(tmp_path, labels: dict[str, int], num_versions: int = 1):
    config = {
        "applications": [
            {
                "name": "mnist",
                "args": {"model_name": "mnist", "model_base_path": "/x", "num_versions": num_versions},
                "deployments": [{"name": "MnistServer", "user_config": {"version_labels": labels}}],
            }
        ]
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_keeps_the_newest_and_removes_the_rest(store):
    report = retention.apply(store, retention.Policy(keep_versions=3))
    assert model_store.list_versions(store) == [5, 6, 7]
    assert report.removed_versions == [1, 2, 3, 4]
    assert not [p for p in store.iterdir() if p.name.startswith(model_store.DELETING_PREFIX)]


def test_dry_run_removes_nothing(store):
    report = retention.apply(store, retention.Policy(keep_versions=1, dry_run=True))
    assert report.removed_versions == [1, 2, 3, 4, 5, 6]
    assert model_store.list_versions(store) == [1, 2, 3, 4, 5, 6, 7]
    assert "would remove" in report.describe()


def test_labels_and_version_policy_of_a_serve_config_stay(store, tmp_path):
    config = _config(tmp_path, {"stable": 2, "canary": 4}, num_versions=2)
    report = retention.apply(store, retention.Policy(keep_versions=1), [str(config)])
    assert model_store.list_versions(store) == [2, 4, 6, 7]
    assert any("label stable" in why for why in report.kept_versions[2])
    assert any("num_versions 2" in why for why in report.kept_versions[6])


def test_a_rayservice_manifest_protects_its_serve_config_labels(store, tmp_path):
    serve = yaml.safe_load(_config(tmp_path, {"stable": 3}).read_text())
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text(
        yaml.safe_dump({"kind": "Secret"})
        + "---\n"
        + yaml.safe_dump({"kind": "RayService", "spec": {"serveConfigV2": yaml.safe_dump(serve)}})
    )
    retention.apply(store, retention.Policy(keep_versions=1), [str(manifest)])
    assert model_store.list_versions(store) == [3, 7]


class _App(http.server.BaseHTTPRequestHandler):
    summary: dict = {}

    def do_GET(self):  # noqa: N802
        if self.path != "/api/models/mnist":
            self.send_error(404)
            return
        body = json.dumps(self.summary).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def app_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_versions_a_running_app_serves_stay(store, app_url):
    _App.summary = {"versions": [{"version": 5}, {"version": 7}], "version_labels": {"canary": 1}}
    retention.apply(store, retention.Policy(keep_versions=1), [app_url])
    assert model_store.list_versions(store) == [1, 5, 7]


def test_an_unreadable_protection_removes_nothing(store, tmp_path, capsys):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(retention.RetentionError):
        retention.apply(store, retention.Policy(keep_versions=1), [dead])
    assert model_store.list_versions(store) == [1, 2, 3, 4, 5, 6, 7]
    code = retention.main(
        ["--model_path", str(store), "--keep", "1", "--protect-from", str(tmp_path / "none.yaml")]
    )
    assert code == retention.EXIT_PROTECTION_UNKNOWN
    assert "nothing removed" in capsys.readouterr().err
    assert model_store.list_versions(store) == [1, 2, 3, 4, 5, 6, 7]


def _age(path, seconds: float) -> None:
    past = time.time() - seconds
    for inner in [path, *path.rglob("*")]:
        os.utime(inner, (past, past))


def test_stale_staging_goes_a_running_export_stays(store):
    policy = retention.Policy(keep_versions=10, staging_max_age_s=60)
    with model_store.staging_dir(store) as running:
        (running / "saved_model.pb").write_bytes(b"half")
        _age(running, 3600)  # old, but its export still holds the lock
        stale = store / f"{model_store.STAGING_PREFIX}killed"
        (stale / "variables").mkdir(parents=True)
        _age(stale, 3600)
        fresh = store / f"{model_store.STAGING_PREFIX}fresh"
        fresh.mkdir()
        half_removed = store / f"{model_store.DELETING_PREFIX}3-abc"
        half_removed.mkdir()
        report = retention.apply(store, policy)
        assert running.is_dir() and fresh.is_dir()
        assert not stale.exists() and not half_removed.exists()
        assert sorted(report.removed_staging) == sorted([stale.name, half_removed.name])
    assert model_store.list_versions(store) == [1, 2, 3, 4, 5, 6, 7]


def test_old_checkpoint_runs_go(store):
    old = store / model_store.CHECKPOINTS_DIR / "mnist-old" / "checkpoint_0"
    new = store / model_store.CHECKPOINTS_DIR / "mnist-new" / "checkpoint_0"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "ckpt.index").write_bytes(b"x")
    _age(old.parent, 8 * 24 * 3600)
    report = retention.apply(store, retention.Policy(keep_versions=10, checkpoint_max_age_s=7 * 24 * 3600))
    assert report.removed_checkpoint_runs == ["mnist-old"]
    assert new.is_dir() and not old.parent.exists()


def test_the_newest_version_always_stays_so_numbers_are_never_reused(store, tmp_path):
    retention.apply(store, retention.Policy(keep_versions=1))
    assert model_store.list_versions(store) == [7]
    assert model_store.next_version(store) == 8


def test_cli_prints_what_it_kept_and_removed(store, capsys):
    assert retention.main(["--model_path", str(store), "--keep", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept versions 6 (newest 2), 7 (newest 2)" in out
    assert "removed versions [1, 2, 3, 4, 5]" in out
    assert retention.main(["--model_path", str(store), "--keep", "0"]) == retention.EXIT_USAGE
