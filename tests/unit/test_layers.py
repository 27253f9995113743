"""The project's packages import one way: ``client`` and ``training`` build on ``ray_app`` (the
protocol, image decoding, the model-store contract), ``ray_app`` on none of ours, and only
``bench`` and ``tests`` may use everything. Read from the source (every ``import``, also inside
functions), so a lazy import cannot hide a cycle.

``python -m tests.unit.test_layers`` prints the picture: who imports whom, and how often.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ray_app", "training", "client", "bench", "tests")
# What each package may import of ours, top to bottom.
ALLOWED = {
    "ray_app": set(),
    "training": {"ray_app"},
    "client": {"ray_app"},
    "bench": {"ray_app", "training", "client"},
    "tests": {"ray_app", "training", "client", "bench"},
}


def import_counts() -> Counter[tuple[str, str]]:
    """(importer, imported) package pairs, each with how many import statements make it."""
    counts: Counter[tuple[str, str]] = Counter()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in PACKAGES and top != package:
                        counts[(package, top)] += 1
    return counts


def test_no_package_imports_one_above_it():
    wrong = {pair: n for pair, n in import_counts().items() if pair[1] not in ALLOWED[pair[0]]}
    assert not wrong, f"imports against the layers (importer, imported): {wrong}"


def test_no_two_packages_import_each_other():
    pairs = set(import_counts())
    assert not {(a, b) for a, b in pairs if (b, a) in pairs}


def main() -> int:
    counts = import_counts()
    for package in PACKAGES:
        uses = ", ".join(f"{b} ({n})" for (a, b), n in sorted(counts.items()) if a == package)
        print(f"{package:8} -> {uses or 'nothing of ours'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
