"""Retention for the model store: keep the newest versions, tidy what killed runs leave behind.

    python -m training.retention --model_path /mnt/models/mnist --keep 5 \\
        --protect-from serve_configs/gpu.yaml --protect-from http://mnist-serve-svc:8000

What goes (``apply``):

- versions older than the newest ``keep_versions``, except every *protected* one: a version that
  a label (``stable``, ``canary``, ...) names, the newest ``num_versions`` that a replica's
  version policy loads, and every version a running app reports loaded. Protections come from
  Serve config files (a RayService manifest's ``serveConfigV2`` too) and from running apps' URLs
  (``/api/models/<name>``). A source that cannot be read stops the whole run before anything is
  removed: an unknown protection must never look like none. The newest version always stays, so
  a version number is never handed out twice.
- staging directories of exports that no longer run (their lock is free) and are older than
  ``staging_max_age_s``, and half-removed versions (``.deleting-*``);
- Ray Train checkpoint runs (``.checkpoints/<run>``) untouched for ``checkpoint_max_age_s``.

A version is removed by renaming it out of the numbered names first (``model_store.remove_version``),
so replicas watching the store see it vanish at once, never half deleted. Safe while serving:
replicas only serve versions the protections name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_app import model_store  # noqa: E402

TOKEN_ENV = "MNIST_TOKEN"  # as the client: the bearer token for apps that check tokens
EXIT_USAGE = 2
EXIT_PROTECTION_UNKNOWN = 5
FETCH_TIMEOUT_S = 5.0
DEFAULT_STAGING_MAX_AGE_S = 3600.0
DEFAULT_CHECKPOINT_MAX_AGE_S = 7 * 24 * 3600.0


class RetentionError(RuntimeError):
    """The protections could not be read: nothing may be removed."""


@dataclass(frozen=True)
class Policy:
    """How much to keep. Ages are in seconds since the newest change inside the directory."""

    keep_versions: int
    staging_max_age_s: float = DEFAULT_STAGING_MAX_AGE_S
    checkpoint_max_age_s: float = DEFAULT_CHECKPOINT_MAX_AGE_S
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {self.keep_versions}")
        if self.staging_max_age_s < 0 or self.checkpoint_max_age_s < 0:
            raise ValueError("ages must be >= 0")


@dataclass
class Protections:
    """Versions that must stay, each with why (``{version: [reason, ...]}``), and policies of the
    form "the newest N" (a replica's ``num_versions``)."""

    versions: dict[int, list[str]] = field(default_factory=dict)
    newest: list[tuple[int, str]] = field(default_factory=list)

    def add(self, version: int, reason: str) -> None:
        self.versions.setdefault(int(version), []).append(reason)

    def resolve(self, published: Sequence[int]) -> dict[int, list[str]]:
        """Every published version that must stay, with its reasons."""
        kept = {v: list(reasons) for v, reasons in self.versions.items() if v in published}
        for count, reason in self.newest:
            for version in list(published)[-count:]:
                kept.setdefault(version, []).append(reason)
        return kept


@dataclass
class Report:
    removed_versions: list[int] = field(default_factory=list)
    kept_versions: dict[int, list[str]] = field(default_factory=dict)
    removed_staging: list[str] = field(default_factory=list)
    removed_checkpoint_runs: list[str] = field(default_factory=list)
    dry_run: bool = False

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        kept = ", ".join(f"{v} ({'; '.join(why)})" for v, why in sorted(self.kept_versions.items()))
        lines = [
            f"Retention: kept versions {kept or 'none'}",
            f"Retention: {verb} versions {self.removed_versions or 'none'}; staging directories "
            f"{len(self.removed_staging)}; checkpoint runs {self.removed_checkpoint_runs or 'none'}",
        ]
        return "\n".join(lines)


def _labels_of_app(app: dict[str, Any], source: str, protections: Protections) -> None:
    args = app.get("args") or {}
    num_versions = args.get("num_versions", 1)
    protections.newest.append((int(num_versions), f"num_versions {num_versions} in {source}"))
    for deployment in app.get("deployments") or []:
        live = deployment.get("user_config") or {}
        for label, version in (live.get("version_labels") or {}).items():
            protections.add(int(version), f"label {label} in {source}")


def protections_from_config(path: Path, protections: Protections) -> None:
    """Labels and version policies of a Serve config file, or of a RayService's ``serveConfigV2``."""
    import yaml

    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, yaml.YAMLError) as exc:
        raise RetentionError(f"cannot read {path}: {exc}") from exc
    found = False
    for doc in documents:
        if doc.get("kind") == "RayService":
            doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
        for app in doc.get("applications") or []:
            _labels_of_app(app, str(path), protections)
            found = True
    if not found:
        raise RetentionError(f"{path} has no Serve applications (a Serve config or a RayService)")


def protections_from_app(
    url: str, model_name: str, protections: Protections, token: str | None = None
) -> None:
    """Labels and loaded versions that a running app reports (its ``/api/models/<name>``)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/api/models/{model_name}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as answer:
            summary = json.loads(answer.read(1 << 20))
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise RetentionError(f"cannot ask {url} which versions it serves: {exc}") from exc
    for entry in summary.get("versions") or []:
        protections.add(int(entry["version"]), f"loaded by {url}")
    for label, version in (summary.get("version_labels") or {}).items():
        protections.add(int(version), f"label {label} at {url}")


def gather(sources: Iterable[str], model_name: str, token: str | None = None) -> Protections:
    """Protections from each source: an ``http(s)://`` URL of a running app, else a config file."""
    protections = Protections()
    for source in sources:
        if source.startswith(("http://", "https://")):
            protections_from_app(source, model_name, protections, token)
        else:
            protections_from_config(Path(source), protections)
    return protections


def _age_s(path: Path, now: float) -> float:
    """Seconds since the newest change of ``path`` or anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir():
        for inner in path.rglob("*"):
            try:
                newest = max(newest, inner.lstat().st_mtime)
            except FileNotFoundError:
                continue
    return now - newest


def _tidy_staging(root: Path, policy: Policy, now: float, report: Report) -> None:
    for entry in root.iterdir():
        name = entry.name
        if name.startswith(model_store.STAGING_PREFIX) and entry.is_dir():
            if model_store.staging_in_use(entry) or _age_s(entry, now) < policy.staging_max_age_s:
                continue
        elif name.startswith(model_store.DELETING_PREFIX) and entry.is_dir():
            pass  # a removal that was interrupted: finish it
        elif name.startswith(model_store.STAGING_PREFIX) and name.endswith(model_store.STAGING_LOCK_SUFFIX):
            staged = entry.with_name(name.removesuffix(model_store.STAGING_LOCK_SUFFIX))
            if staged.exists() or model_store.staging_in_use(staged):
                continue
            if not policy.dry_run:
                entry.unlink(missing_ok=True)
            continue
        else:
            continue
        report.removed_staging.append(name)
        if not policy.dry_run:
            shutil.rmtree(entry, ignore_errors=True)
            model_store.staging_lock_path(entry).unlink(missing_ok=True)


def _tidy_checkpoints(root: Path, policy: Policy, now: float, report: Report) -> None:
    checkpoints = root / model_store.CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return
    for run in sorted(checkpoints.iterdir()):
        if run.is_dir() and _age_s(run, now) >= policy.checkpoint_max_age_s:
            report.removed_checkpoint_runs.append(run.name)
            if not policy.dry_run:
                shutil.rmtree(run, ignore_errors=True)


def apply(
    base_path: str | Path,
    policy: Policy,
    sources: Iterable[str] = (),
    *,
    model_name: str | None = None,
    token: str | None = None,
    now: float | None = None,
) -> Report:
    """Apply ``policy`` to the store, never removing what ``sources`` protect. Raises RetentionError
    (before removing anything) when a source cannot be read."""
    root = model_store.store_path(base_path)
    protections = gather(sources, model_name or root.resolve().name, token)
    now = time.time() if now is None else now
    report = Report(dry_run=policy.dry_run)
    published = model_store.list_versions(root)
    protections.newest.append((policy.keep_versions, f"newest {policy.keep_versions}"))
    kept = protections.resolve(published)
    report.kept_versions = kept
    for version in published:
        if version not in kept:
            report.removed_versions.append(version)
            if not policy.dry_run:
                model_store.remove_version(root, version)
    if root.is_dir():
        _tidy_staging(root, policy, now, report)
        _tidy_checkpoints(root, policy, now, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-retention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_path", "--model-path", dest="model_path", required=True, help="the model store")
    p.add_argument("--keep", type=int, required=True, help="newest versions to keep (>= 1)")
    p.add_argument(
        "--protect-from",
        action="append",
        default=[],
        metavar="CONFIG_OR_URL",
        help="a Serve config / RayService file, or a running app's http(s) URL: its labelled, "
        "policy and loaded versions stay (repeatable)",
    )
    p.add_argument(
        "--model-name", default=None, help="model name at the URLs (default: the store's dir name)"
    )
    p.add_argument(
        "--token-file",
        default=None,
        help=f"bearer token for the URLs, from this file (default: ${TOKEN_ENV})",
    )
    p.add_argument("--staging-max-age-s", type=float, default=DEFAULT_STAGING_MAX_AGE_S)
    p.add_argument("--checkpoint-max-age-s", type=float, default=DEFAULT_CHECKPOINT_MAX_AGE_S)
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        policy = Policy(args.keep, args.staging_max_age_s, args.checkpoint_max_age_s, args.dry_run)
        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = apply(args.model_path, policy, args.protect_from, model_name=args.model_name, token=token)
    except model_store.ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RetentionError as exc:
        print(f"error: {exc}; nothing removed", file=sys.stderr)
        return EXIT_PROTECTION_UNKNOWN
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
