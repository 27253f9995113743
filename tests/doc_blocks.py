"""The documentation's checked code blocks: what tests run or parse from README.md and docs/.

A block that a test runs is marked in the Markdown by ``<!-- readme-check: NAME -->`` on the line
before its fence; the marker may sit in README.md or any page under docs/ (the content moved to
docs/ in issue 19, the mechanism stayed).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def doc_files() -> list[Path]:
    """README.md, then every Markdown page of docs/ (sorted: a marker's blocks keep a stable order)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def doc_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in doc_files())


def blocks(marker: str) -> list[tuple[str, str]]:
    """(language, code) of every code block right after ``<!-- readme-check: marker -->``."""
    pattern = rf"<!-- readme-check: {re.escape(marker)} -->\n```(\w+)\n(.*?)```"
    return re.findall(pattern, doc_text(), flags=re.S)
