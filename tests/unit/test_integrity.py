"""A version cannot be swapped for code: publishing writes a manifest, and a version whose files
differ from it (another valid SavedModel, a file added or removed) is never served."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ray_app import model_store
from ray_app.backends.embedded import EmbeddedBackend
from ray_app.config import AppConfig, IntegrityOptions
from ray_app.manifest import IntegrityError, verify_version, write_manifest
from tests.conftest import publish_copy, tamper_with_weights
from tests.unit.conftest import run_on_replica_loop
from training import integrity
from training.data import load_mnist

pytestmark = pytest.mark.usefixtures("replica_context")


def _publish_files(store: Path, version: int, signing_key=None) -> Path:
    """A small version of plain files, published as training publishes."""
    with model_store.staging_dir(store) as staged:
        (staged / "saved_model.pb").write_bytes(b"graph")
        (staged / "variables").mkdir()
        (staged / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights")
        (staged / "assets.extra").mkdir()
        (staged / "assets.extra" / "metrics.json").write_text("{}")
        model_store.publish(staged, store, version, signing_key)
    return model_store.version_path(store, version)


def test_publishing_writes_a_manifest_that_lists_every_file(tmp_path) -> None:
    version = _publish_files(tmp_path, 1)
    assert verify_version(version) is True
    manifest = (version / "assets.extra" / "manifest.json").read_text()
    for name in ("saved_model.pb", "variables/variables.data-00000-of-00001", "assets.extra/metrics.json"):
        assert f'"{name}"' in manifest


def _change_same_size(version: Path) -> None:
    (version / "variables" / "variables.data-00000-of-00001").write_bytes(b"WEIGHTS")


def _add(version: Path) -> None:
    (version / "assets.extra" / "loader.py").write_text("import os")


def _remove(version: Path) -> None:
    (version / "assets.extra" / "metrics.json").unlink()


def _link(version: Path) -> None:
    target = version.parent / "elsewhere"
    target.write_bytes(b"weights")
    data = version / "variables" / "variables.data-00000-of-00001"
    data.unlink()
    data.symlink_to(target)


@pytest.mark.parametrize(
    ("alter", "why"),
    [
        (_change_same_size, "SHA-256 differs"),
        (_add, "not in the manifest: assets.extra/loader.py"),
        (_remove, "files missing: assets.extra/metrics.json"),
        (_link, "symbolic link"),
    ],
    ids=["changed", "added", "removed", "symlink"],
)
def test_a_version_altered_after_publishing_is_refused(tmp_path, alter, why) -> None:
    version = _publish_files(tmp_path, 1)
    alter(version)
    with pytest.raises(IntegrityError, match=why):
        verify_version(version)


def test_a_version_without_a_manifest_is_refused_unless_allowed(tmp_path) -> None:
    version = _publish_files(tmp_path, 1)
    (version / "assets.extra" / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="no assets.extra/manifest.json"):
        verify_version(version)
    assert verify_version(version, require_manifest=False) is False


def test_signed_versions_verify_only_with_a_trusted_key(tmp_path) -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = _publish_files(tmp_path, 1, signing_key=trusted)
    # rotation: the old and the new key are trusted at once
    assert verify_version(signed, trusted_keys=[other.public_key(), trusted.public_key()])
    with pytest.raises(IntegrityError, match="does not match any trusted key"):
        verify_version(signed, trusted_keys=[other.public_key()])
    unsigned = _publish_files(tmp_path, 2)
    with pytest.raises(IntegrityError, match="not signed"):
        verify_version(unsigned, trusted_keys=[trusted.public_key()])
    # whoever rewrites files and manifest together cannot sign the new manifest without the key
    signature = (signed / "assets.extra" / "manifest.json.sig").read_bytes()
    _change_same_size(signed)
    write_manifest(signed)  # a manifest that matches the altered files
    (signed / "assets.extra" / "manifest.json.sig").write_bytes(signature)  # the old signature
    with pytest.raises(IntegrityError, match="does not match any trusted key"):
        verify_version(signed, trusted_keys=[trusted.public_key()])


def test_the_cli_makes_keys_seals_an_old_store_and_verifies_it(tmp_path, capsys) -> None:
    old = _publish_files(tmp_path / "store", 1)
    (old / "assets.extra" / "manifest.json").unlink()  # published before manifests existed
    assert integrity.main(["verify", str(tmp_path / "store")]) == 1
    private, public = tmp_path / "signing.pem", tmp_path / "signing.pub"
    assert integrity.main(["keygen", "--private-key", str(private), "--public-key", str(public)]) == 0
    assert private.stat().st_mode & 0o077 == 0
    assert integrity.main(["seal", str(tmp_path / "store"), "--signing-key", str(private)]) == 0
    assert integrity.main(["verify", str(tmp_path / "store"), "--trusted-key", str(public)]) == 0
    assert "OK" in capsys.readouterr().out


# -- the embedded backend: a refused version is never loaded, the last good one keeps serving -------
IMAGES = load_mnist().test.images[:64]


class _Observer:
    def __init__(self) -> None:
        self.failures: list[tuple[int, str]] = []

    def loaded(self, version: int, seconds: float) -> None:
        pass

    def load_failed(self, version: int, reason: str) -> None:
        self.failures.append((version, reason))


def _warmup_removed(version: Path) -> None:
    (version / "assets.extra" / "tf_serving_warmup_requests").unlink()


def _file_added(version: Path) -> None:
    (version / "assets" / "extra_op.so").parent.mkdir(exist_ok=True)
    (version / "assets" / "extra_op.so").write_bytes(b"\x7fELF")


@pytest.mark.parametrize(
    "alter", [tamper_with_weights, _file_added, _warmup_removed], ids=["resaved-weights", "added", "removed"]
)
def test_the_embedded_backend_never_serves_an_altered_version(store, trained_export, alter) -> None:
    tampered = publish_copy(trained_export, store, 2)
    alter(tampered)

    async def scenario():
        # No retry within the test, however slow the host: one attempt, refused once.
        config = AppConfig(
            model_base_path=str(store), poll_interval_s=0.2, num_versions=1, load_retry_initial_s=300
        )
        backend = EmbeddedBackend(config)
        backend.observer = observer = _Observer()
        await backend.start()
        try:
            assert backend.versions() == [1]  # the last good version serves in its place
            state = backend.version_states()[2]
            outputs = await backend.predict(1, "serving_default", {"images": IMAGES}, ())
            return state, observer.failures, outputs["classes"]
        finally:
            await backend.stop()

    state, failures, classes = run_on_replica_loop(scenario())
    assert state.state == "END" and state.error_code == "DATA_LOSS"
    assert state.error.startswith("IntegrityError:")
    assert failures == [(2, "IntegrityError")]
    assert np.mean(classes == load_mnist().test.labels[:64]) > 0.8


def test_the_resaved_version_is_a_valid_model_that_answers_differently(tmp_path, trained_export) -> None:
    """What the test above refuses is a working model, not a corrupt one TensorFlow itself rejects."""
    from training.export import load_classifier

    copy = tmp_path / "copy"
    shutil.copytree(trained_export, copy)
    tamper_with_weights(copy)
    original, altered = load_classifier(trained_export)(IMAGES), load_classifier(copy)(IMAGES)
    assert np.array_equal(altered, (original + 1) % 10)


def test_a_replica_with_trusted_keys_serves_only_signed_versions(tmp_path, trained_export) -> None:
    key = Ed25519PrivateKey.generate()
    public = tmp_path / "trusted.pub"
    from cryptography.hazmat.primitives import serialization

    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    store = tmp_path / "mnist"
    publish_copy(trained_export, store, 1)  # unsigned
    with model_store.staging_dir(store) as staged:
        shutil.copytree(trained_export, staged, dirs_exist_ok=True)
        model_store.publish(staged, store, 2, signing_key=key)

    async def scenario():
        config = AppConfig(model_base_path=str(store), integrity=IntegrityOptions(trusted_keys=[str(public)]))
        backend = EmbeddedBackend(config)
        await backend.start()
        try:
            return backend.versions(), backend.version_states()
        finally:
            await backend.stop()

    versions, states = run_on_replica_loop(scenario())
    assert versions == [2]
    assert "not signed" in states[1].error
