"""The documentation: docs/ builds strictly with MkDocs, its generated reference comes from the code,
and every relative link (README.md's, the pages', the generated ones') names a file that exists."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from tests import doc_blocks
from training import arguments

REPO = Path(__file__).resolve().parents[2]
MKDOCS_YML = REPO / "mkdocs.yml"


def _hook():
    """docs/hooks/reference.py, loaded by path as MkDocs loads it."""
    spec = importlib.util.spec_from_file_location(
        "docs_reference_hook", REPO / "docs" / "hooks" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": str(Path(sys.executable).parent), "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)},
    )


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    result = _build(MKDOCS_YML, site)
    assert result.returncode == 0, result.stdout + result.stderr
    configuration = (site / "reference" / "configuration" / "index.html").read_text()
    for name in ("max_request_bytes", "canary_traffic_percent", "poll_interval_s", "init_from"):
        assert f"<code>{name}</code>" in configuration, name
    assert "<!-- reference:" not in configuration
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for usage in (
        "usage: mnist-train",
        "usage: mnist-retention",
        "usage: mnist-client",
        "usage: mnist-pipeline",
    ):
        assert usage in cli, usage
    front_door = (site / "reference" / "front-door" / "index.html").read_text()
    assert "<!-- reference:" not in front_door and "export RAY_SERVE_ENABLE_HA_PROXY=" in front_door
    # bench/README.md, linked from the pages, is copied into the site as a page of its own
    assert "Figures moved from the README" in (site / "_repo" / "bench" / "index.html").read_text()


def test_a_broken_link_fails_the_build(tmp_path):
    repo = tmp_path / "repo"  # the checkout, with a copy of docs/ to break
    repo.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("docs", ".git", ".venv", "site"):
            (repo / entry.name).symlink_to(entry)
    docs = repo / "docs"
    shutil.copytree(REPO / "docs", docs, ignore=shutil.ignore_patterns("__pycache__"))
    page = docs / "how-to" / "troubleshooting.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = _build(repo / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_links_out_of_docs_must_name_a_repository_file():
    hook = _hook()
    assert hook.resolve("kubernetes.md", "../bench/README.md#x") == "_repo/bench/README.md"
    assert hook.resolve("how-to/aws.md", "../../cluster.yaml") == "_repo/cluster.yaml"
    assert hook.resolve("how-to/aws.md", "../kubernetes.md") == "kubernetes.md"
    assert hook.resolve("_repo/bench/README.md", "../docs/oip.md") == "oip.md"
    assert hook.resolve("index.md", "https://example.com/x.md") is None
    with pytest.raises(Exception, match="no file bench/NOPE.md"):
        hook.resolve("kubernetes.md", "../bench/NOPE.md")
    with pytest.raises(Exception, match="leaves the repository"):
        hook.resolve("index.md", "../../outside.md")


class Described(BaseModel):
    size_bytes: int = Field(default=1, gt=0, description="how big")


class Undescribed(BaseModel):
    size_bytes: int = 1


@dataclass
class DataclassUndescribed:
    documented: int = field(default=1, metadata={"description": "yes"})
    bare: int = 2


def test_the_configuration_table_needs_a_description_for_every_field():
    hook = _hook()
    table = hook.config_table(f"{__name__}:Described")
    assert "| `size_bytes` | int | `1` | gt `0` | how big |" in table
    with pytest.raises(Exception, match="without a description: size_bytes"):
        hook.config_table(f"{__name__}:Undescribed")
    with pytest.raises(Exception, match="without a description: bare"):
        hook.config_table(f"{__name__}:DataclassUndescribed")


def _relative_links(markdown: str) -> list[str]:
    links = re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return [
        link
        for link in links
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) and not link.startswith("#")
    ]


def test_every_relative_link_of_the_readme_names_a_file():
    links = _relative_links((REPO / "README.md").read_text())
    assert links, "the README links to its docs"
    missing = [link for link in links if not (REPO / link.split("#")[0]).is_file()]
    assert not missing, missing


def test_the_training_commands_of_the_docs_parse_with_train_py():
    ((language, block),) = doc_blocks.blocks("train-commands")
    assert language == "bash"
    runs = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if "training/train.py" in words:
            runs.append(arguments.build_parser().parse_args(words[words.index("training/train.py") + 1 :]))
    assert len(runs) == len([line for line in block.splitlines() if "training/train.py" in line]) >= 1


# The pages of the README's move to docs/ (issue 19) and the README itself; other pages' blocks
# (docs/kubernetes.md, docs/oip.md, ...) are their own modules' to check.
_COMMAND_LANGUAGES = ("bash", "sh", "shell", "console", "python")


def test_every_command_block_is_checked_by_a_test_or_says_why_not():
    pages = [REPO / "README.md"] + [
        page
        for part in ("tutorial", "how-to", "reference", "explanation")
        for page in (REPO / "docs" / part).rglob("*.md")
    ]
    unmarked = []
    for page in pages:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.startswith("```") and line[3:].strip() in _COMMAND_LANGUAGES:
                before = lines[number - 1] if number else ""
                if not before.startswith(("<!-- readme-check: ", "<!-- not-run: ")):
                    unmarked.append(f"{page.relative_to(REPO)}:{number + 1}")
    assert not unmarked, f"command blocks with neither a readme-check nor a not-run marker: {unmarked}"
    # every readme-check block is one that a test reads
    for name in (
        "set-up",
        "test-command",
        "pipeline-steps",
        "run-against-app",
        "retention",
        "train-commands",
        "aws-walkthrough",
    ):
        assert doc_blocks.blocks(name), name
