"""The command line for version manifests (the format: ``ray_app.manifest``): make a signing key
pair, seal the versions of an existing store, check a store. Run it where training runs, as the
user that owns the store::

    python -m training.integrity keygen --private-key signing.pem --public-key signing.pub
    python -m training.integrity seal models/mnist [--signing-key signing.pem]   # migration
    python -m training.integrity verify models/mnist [--trusted-key signing.pub] [--allow-unsealed]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ray_app.manifest import (
    IntegrityError,
    has_manifest,
    load_private_key,
    load_public_key,
    verify_version,
    write_manifest,
)


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
    from ray_app import model_store

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
