"""A version's manifest: every file it holds with its SHA-256, optionally signed (Ed25519).

Training writes ``assets.extra/manifest.json`` when it publishes a version
(``model_store.publish``); every serving backend checks it before it loads or serves the version
(``ray_app.integrity``). A version whose files differ from its manifest in any way (a file
changed, added or removed, a symbolic link, a manifest that is not the one the trusted key
signed) is refused. The manifest lives in ``assets.extra/``, where TF Serving keeps a version's
extra files and which it never loads as part of the model; the manifest and its signature are
the only files it does not list.

The signature (``assets.extra/manifest.json.sig``, base64 of a raw Ed25519 signature over the
exact bytes of ``manifest.json``) is made with a private key only training holds; servers trust
the public keys their config names (``AppConfig.integrity.trusted_keys``), several at once so a
key can be rotated. This module has no TensorFlow dependency so servers import it cheaply.

CLI (run it where training runs, as the user that owns the store)::

    python -m training.integrity keygen --private-key signing.pem --public-key signing.pub
    python -m training.integrity seal models/mnist [--signing-key signing.pem]   # migration
    python -m training.integrity verify models/mnist [--trusted-key signing.pub] [--allow-unsealed]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import stat
import sys
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
def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = Path(args.private_key)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    Path(args.public_key).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    print(f"private key {private} (keep it where training runs), public key {args.public_key}")
    return 0


def _versions(store: Path) -> list[Path]:
    from training import model_store

    return [model_store.version_path(store, v) for v in model_store.list_versions(store)]


def _seal(args: argparse.Namespace) -> int:
    key = load_private_key(args.signing_key) if args.signing_key else None
    for version_dir in _versions(Path(args.store)):
        if has_manifest(version_dir) and not args.force:
            print(f"{version_dir}: has a manifest, left as it is")
            continue
        write_manifest(version_dir, key)
        print(f"{version_dir}: sealed{' and signed' if key else ''}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = [load_public_key(path) for path in args.trusted_key]
    failed = 0
    for version_dir in _versions(Path(args.store)):
        try:
            verified = verify_version(
                version_dir, require_manifest=not args.allow_unsealed, trusted_keys=keys
            )
            print(f"{version_dir}: {'OK' if verified else 'no manifest (not required)'}")
        except (IntegrityError, OSError) as exc:
            failed += 1
            print(f"{version_dir}: REFUSED: {exc}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.integrity", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for signing versions")
    keygen.add_argument("--private-key", required=True)
    keygen.add_argument("--public-key", required=True)
    keygen.set_defaults(run=_keygen)
    seal = commands.add_parser(
        "seal", help="write manifests for the versions of a store that have none (migration)"
    )
    seal.add_argument("store")
    seal.add_argument("--signing-key", default=None, help="Ed25519 private key (PEM) to sign them with")
    seal.add_argument("--force", action="store_true", help="also rewrite existing manifests (re-sign)")
    seal.set_defaults(run=_seal)
    verify = commands.add_parser("verify", help="check every version of a store as the servers do")
    verify.add_argument("store")
    verify.add_argument("--trusted-key", action="append", default=[], help="Ed25519 public key (PEM)")
    verify.add_argument("--allow-unsealed", action="store_true", help="accept versions without a manifest")
    verify.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
