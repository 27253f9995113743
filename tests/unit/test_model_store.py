import json
import threading
from pathlib import Path

import pytest

from ray_app import model_store
from ray_app.model_store import ModelStoreError, VersionExistsError


def _fake_export(directory: Path, marker: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "saved_model.pb").write_bytes(b"graph" + marker.encode())
    (directory / "variables").mkdir(exist_ok=True)
    return directory


def test_versions_ignore_staging_incomplete_and_non_integer_dirs(tmp_path):
    store = tmp_path / "mnist"
    _fake_export(store / "1")
    _fake_export(store / "10")
    (store / "3").mkdir()  # no saved_model.pb: half-written by someone else
    _fake_export(store / ".staging-abc")
    _fake_export(store / "latest")
    assert model_store.list_versions(store) == [1, 10]
    assert model_store.latest_version(store) == 10
    assert model_store.next_version(store) == 11
    assert model_store.list_versions(tmp_path / "missing") == []
    assert model_store.latest_version(tmp_path / "missing") is None


def test_publish_moves_staging_into_the_next_version(tmp_path):
    store = tmp_path / "mnist"
    with model_store.staging_dir(store) as staged:
        assert staged.name.startswith(".staging-") and staged.parent == store
        _fake_export(staged)
        assert model_store.publish(staged, store) == 1
    with model_store.staging_dir(store) as staged:
        _fake_export(staged)
        assert model_store.publish(staged, store, 7) == 7
    assert model_store.list_versions(store) == [1, 7]
    assert [p.name for p in store.iterdir() if p.name.startswith(".staging")] == []
    assert (store / "7").stat().st_mode & 0o777 == 0o755


def test_publish_refuses_to_overwrite(tmp_path):
    store = tmp_path / "mnist"
    _fake_export(store / "1", "original")
    with model_store.staging_dir(store) as staged:
        _fake_export(staged, "new")
        with pytest.raises(VersionExistsError, match="version 1 already exists"):
            model_store.publish(staged, store, 1)
    assert (store / "1" / "saved_model.pb").read_bytes() == b"graphoriginal"
    # An empty directory with the number still counts as taken (rename would replace it).
    (store / "2").mkdir()
    with model_store.staging_dir(store) as staged, pytest.raises(VersionExistsError):
        _fake_export(staged)
        model_store.publish(staged, store, 2)


def test_failure_during_export_leaves_no_version_behind(tmp_path):
    store = tmp_path / "mnist"
    with pytest.raises(RuntimeError), model_store.staging_dir(store) as staged:
        _fake_export(staged)
        raise RuntimeError("export crashed")
    assert model_store.list_versions(store) == []
    assert [p.name for p in store.iterdir() if not p.name.startswith(".publish")] == []


def test_publish_rejects_incomplete_export_and_bad_versions(tmp_path):
    store = tmp_path / "mnist"
    with model_store.staging_dir(store) as staged:
        with pytest.raises(ModelStoreError, match="not a SavedModel"):
            model_store.publish(staged, store)
        _fake_export(staged)
        with pytest.raises(ModelStoreError, match="positive integer"):
            model_store.publish(staged, store, 0)


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    store = tmp_path / "mnist"
    results: list[int] = []

    def publish_one() -> None:
        with model_store.staging_dir(store) as staged:
            _fake_export(staged)
            results.append(model_store.publish(staged, store))

    threads = [threading.Thread(target=publish_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(1, 9))


def test_read_metrics(tmp_path):
    store = tmp_path / "mnist"
    version_dir = _fake_export(store / "1")
    assert model_store.read_metrics(store, 1) == {}
    (version_dir / "assets.extra").mkdir()
    (version_dir / "assets.extra" / "metrics.json").write_text(json.dumps({"test_accuracy": 0.99}))
    assert model_store.read_metrics(store, 1) == {"test_accuracy": 0.99}
    (version_dir / "assets.extra" / "metrics.json").write_text("{broken")
    with pytest.raises(ModelStoreError, match="cannot read"):
        model_store.read_metrics(store, 1)


def test_remote_uris_are_refused_with_advice():
    with pytest.raises(ModelStoreError, match="mount the bucket"):
        model_store.list_versions("s3://bucket/models/mnist")
