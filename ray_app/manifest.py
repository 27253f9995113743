"""A version's manifest: every file it holds with its SHA-256, optionally signed (Ed25519).

Part of the model store's contract (``ray_app.model_store``), shared by both sides: training
writes ``assets.extra/manifest.json`` when it publishes a version (``model_store.publish``);
every serving backend checks it before it loads or serves the version (``ray_app.integrity``). A
version whose files differ from its manifest in any way (a file changed, added or removed, a
symbolic link, a manifest that is not the one the trusted key signed) is refused. The manifest
lives in ``assets.extra/``, where TF Serving keeps a version's extra files and which it never
loads as part of the model; the manifest and its signature are the only files it does not list.

The signature (``assets.extra/manifest.json.sig``, base64 of a raw Ed25519 signature over the
exact bytes of ``manifest.json``) is made with a private key only training holds; servers trust
the public keys their config names (``AppConfig.integrity.trusted_keys``), several at once so a
key can be rotated. No TensorFlow here, so servers import it cheaply. The command line that
makes keys and seals or checks a store is ``training.integrity``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.json.sig"
EXTRA_DIR = "assets.extra"  # TF Serving's directory of a version's extra files (model_store uses it)
FORMAT = "mnist-version-manifest/1"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is read whole: its size is checked first
MAX_SIGNATURE_BYTES = 1024
_CHUNK_BYTES = 1 << 20
_OWN_FILES = {f"{EXTRA_DIR}/{MANIFEST_FILE}", f"{EXTRA_DIR}/{SIGNATURE_FILE}"}


class IntegrityError(RuntimeError):
    """A version's files do not match its manifest (or it has none, or a bad signature)."""


def _version_files(version_dir: Path) -> dict[str, os.stat_result]:
    """Every file under ``version_dir`` (relative POSIX paths) but the manifest's own; refuses
    anything that is not a regular file or directory (a symbolic link can point anywhere)."""
    found: dict[str, os.stat_result] = {}
    for root, dirs, files in os.walk(version_dir, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            relative = path.relative_to(version_dir).as_posix()
            if stat.S_ISLNK(info.st_mode):
                raise IntegrityError(f"{relative} is a symbolic link; a version holds only regular files")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise IntegrityError(f"{relative} is not a regular file")
            if relative not in _OWN_FILES:
                found[relative] = info
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(version_dir: Path) -> bytes:
    """The manifest of ``version_dir`` as it is now (canonical JSON bytes)."""
    files = {
        relative: {"sha256": file_sha256(version_dir / relative), "bytes": info.st_size}
        for relative, info in sorted(_version_files(version_dir).items())
    }
    document = {"format": FORMAT, "algorithm": "sha256", "files": files}
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def load_private_key(path: str | os.PathLike[str]):
    """An Ed25519 private key from a PEM (PKCS#8) file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]):
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def write_manifest(version_dir: Path, signing_key: Any | None = None) -> Path:
    """Write (or rewrite) ``assets.extra/manifest.json`` for the files now in ``version_dir``, and
    its signature when ``signing_key`` (an Ed25519 private key) is given."""
    manifest = build_manifest(version_dir)
    extra = version_dir / EXTRA_DIR
    extra.mkdir(exist_ok=True)
    path = extra / MANIFEST_FILE
    path.write_bytes(manifest)
    signature_path = extra / SIGNATURE_FILE
    signature_path.unlink(missing_ok=True)
    if signing_key is not None:
        signature_path.write_bytes(base64.b64encode(signing_key.sign(manifest)) + b"\n")
    return path


def has_manifest(version_dir: Path) -> bool:
    return (version_dir / EXTRA_DIR / MANIFEST_FILE).is_file()


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise IntegrityError(f"{path.name} is {size} bytes, more than a manifest may be ({max_bytes})")
    return path.read_bytes()


def _check_signature(manifest: bytes, signature_path: Path, trusted_keys: Sequence[Any]) -> None:
    from cryptography.exceptions import InvalidSignature

    if not signature_path.is_file():
        raise IntegrityError(f"manifest is not signed ({EXTRA_DIR}/{SIGNATURE_FILE} missing)")
    try:
        signature = base64.b64decode(
            _read_bounded(signature_path, MAX_SIGNATURE_BYTES).strip(), validate=True
        )
    except ValueError as exc:
        raise IntegrityError(f"{SIGNATURE_FILE} is not base64") from exc
    for key in trusted_keys:
        try:
            key.verify(signature, manifest)
            return
        except InvalidSignature:
            continue
    raise IntegrityError("manifest signature does not match any trusted key")


def _parse(manifest: bytes) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(manifest)
        files = document["files"]
        if document.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {document.get('format')!r}")
        return {str(k): {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])} for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"manifest is not readable: {exc}") from exc


def _describe(paths: Iterable[str]) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def verify_version(
    version_dir: Path, *, require_manifest: bool = True, trusted_keys: Sequence[Any] = ()
) -> bool:
    """Check ``version_dir`` against its manifest; raise IntegrityError saying why it does not match.

    Returns True when verified, False when it has no manifest and ``require_manifest`` is off.
    With ``trusted_keys`` (Ed25519 public keys) the manifest must carry a signature by one of them.
    """
    manifest_path = version_dir / EXTRA_DIR / MANIFEST_FILE
    if not manifest_path.is_file():
        if require_manifest:
            raise IntegrityError(
                f"no {EXTRA_DIR}/{MANIFEST_FILE}: published without a manifest "
                "(seal it with `python -m training.integrity seal`, see docs/security.md)"
            )
        return False
    manifest = _read_bounded(manifest_path, MAX_MANIFEST_BYTES)
    if trusted_keys:
        _check_signature(manifest, version_dir / EXTRA_DIR / SIGNATURE_FILE, trusted_keys)
    expected = _parse(manifest)
    present = _version_files(version_dir)
    if added := present.keys() - expected.keys():
        raise IntegrityError(f"files not in the manifest: {_describe(added)}")
    if missing := expected.keys() - present.keys():
        raise IntegrityError(f"files missing: {_describe(missing)}")
    for relative, entry in sorted(expected.items()):
        if present[relative].st_size != entry["bytes"]:
            raise IntegrityError(
                f"{relative}: {present[relative].st_size} bytes, manifest says {entry['bytes']}"
            )
        if file_sha256(version_dir / relative) != entry["sha256"]:
            raise IntegrityError(f"{relative}: SHA-256 differs from the manifest")
    return True


# -- CLI -------------------------------------------------------------------------------------------
