"""MkDocs hook: the reference pages' generated parts, and links to files outside docs/.

Two jobs, both at build time so nothing generated is committed (nothing can go stale):

- ``<!-- reference: config MODULE:CLASS -->`` becomes a table of that model's fields (name, type,
  default, constraints, description), read from the pydantic model's ``Field(description=...)``
  or a dataclass field's ``metadata["description"]``; a field without a description fails the
  build. ``<!-- reference: cli MODULE -->`` becomes ``python -m MODULE --help`` as argparse prints
  it (usage, options, the epilog with the exit codes); ``<!-- reference: run MODULE ARGS -->``
  becomes what ``python -m MODULE ARGS`` prints.
- A relative link that leaves docs/ (``../bench/README.md``, ``../../cluster.yaml``) must name a
  file of the repository: such files are copied into the site under ``_repo/`` (Markdown ones
  rendered as pages, their own links treated the same way) and the link is pointed at the copy,
  so a link works both on the forge (relative to the file) and on the built site. A link to a
  file that does not exist fails the build; links inside docs/ are MkDocs' own to check (strict).

``tests/unit/test_docs.py`` builds the site with ``mkdocs build --strict``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import posixpath
import re
import shlex
import subprocess
import sys
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
DOCS = "docs"
MIRROR = "_repo"  # where copies of repository files outside docs/ go in the site

_MARKER = re.compile(r"<!-- reference: (config|cli|run) ([\w.:]+(?: [^<>]*?)?) -->")
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


# ------------------------------------------------------------------ configuration tables


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return "`" + repr(value).replace("|", "\\|") + "`"


def _pydantic_rows(model: type) -> list[tuple[str, str, str, str, str]]:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    rows = []
    for name, info in model.model_fields.items():
        if info.default_factory is not None:
            made = info.default_factory()
            default = type(made).__name__ + "()" if isinstance(made, BaseModel) else _code(made)
        elif info.default is PydanticUndefined:
            default = "required"
        else:
            default = _code(info.default)
        constraints = ", ".join(
            f"{key} `{getattr(m, key)}`"
            for m in info.metadata
            for key in ("gt", "ge", "lt", "le", "pattern")
            if getattr(m, key, None) is not None
        )
        rows.append((name, _type_name(info.annotation), default, constraints, info.description or ""))
    return rows


def _dataclass_rows(model: type) -> list[tuple[str, str, str, str, str]]:
    hints = typing.get_type_hints(model)
    rows = []
    for f in dataclasses.fields(model):
        if f.default is not dataclasses.MISSING:
            default = _code(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _code(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, _type_name(hints[f.name]), default, "", f.metadata.get("description", "")))
    return rows


def config_table(target: str) -> str:
    """The Markdown table of a config model's fields, ``target`` as ``module:Class``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's code, not an installed copy's
    module_name, _, class_name = target.partition(":")
    model = getattr(importlib.import_module(module_name), class_name)
    if hasattr(model, "model_fields"):
        rows = _pydantic_rows(model)
    elif dataclasses.is_dataclass(model):
        rows = _dataclass_rows(model)
    else:
        raise PluginError(f"{target} is neither a pydantic model nor a dataclass")
    missing = [name for name, *_, description in rows if not description.strip()]
    if missing:
        raise PluginError(f"{target}: fields without a description: {', '.join(missing)}")
    lines = ["| field | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    for name, type_name, default, constraints, description in rows:
        lines.append(
            f"| `{name}` | {_cell(type_name)} | {default} | {_cell(constraints)} | {_cell(description)} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI help


def cli_help(module: str) -> str:
    """``python -m module --help`` as a text block (argparse's own rendering, 100 columns)."""
    return run_module(module, "--help")


def run_module(module: str, *args: str) -> str:
    """What ``python -m module args...`` prints (this checkout's code), as a text block."""
    env = {
        **os.environ,
        "COLUMNS": "100",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise PluginError(
            f"python -m {module} {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}"
        )
    return "```text\n" + result.stdout.rstrip() + "\n```"


def expand_markers(markdown: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, target = match.groups()
        if kind == "config":
            return config_table(target)
        if kind == "cli":
            return cli_help(target)
        module, *args = shlex.split(target)
        return run_module(module, *args)

    return _MARKER.sub(replace, markdown)


# ------------------------------------------------------------------ links that leave docs/


def _outside_code(markdown: str, edit: Any) -> str:
    """``edit`` applied to the parts of ``markdown`` outside fenced code blocks."""
    out, last = [], 0
    for fence in _FENCE.finditer(markdown):
        out.append(edit(markdown[last : fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(edit(markdown[last:]))
    return "".join(out)


def _source_path(src_uri: str) -> PurePosixPath:
    """The repository path of a site file (``kubernetes.md`` → docs/kubernetes.md; _repo/x → x)."""
    if src_uri.startswith(MIRROR + "/"):
        return PurePosixPath(src_uri[len(MIRROR) + 1 :])
    return PurePosixPath(DOCS) / src_uri


def _site_uri(repo_path: PurePosixPath) -> str:
    if repo_path.parts[:1] == (DOCS,):
        return str(PurePosixPath(*repo_path.parts[1:]))
    return f"{MIRROR}/{repo_path}"


def resolve(page_src_uri: str, target: str) -> str | None:
    """The site URI a relative link of a page points at, or None when it is not a file link.

    Raises PluginError for a link out of docs/ to a file the repository does not have."""
    if not target or target.startswith(("#", "/")) or _SCHEME.match(target):
        return None
    path, _, _ = target.partition("#")
    path = path.partition("?")[0]
    if not path:
        return None
    here = _source_path(page_src_uri).parent
    joined = posixpath.normpath(posixpath.join(str(here), path))
    if joined.startswith(".."):
        raise PluginError(f"{page_src_uri}: link {target!r} leaves the repository")
    repo_path = PurePosixPath(joined)
    if repo_path.parts[:1] != (DOCS,) and not (REPO / repo_path).is_file():
        raise PluginError(f"{page_src_uri}: link {target!r}: no file {repo_path} in the repository")
    return _site_uri(repo_path)


def _links(page_src_uri: str, markdown: str) -> list[str]:
    found: list[str] = []

    def collect(text: str) -> str:
        for match in _LINK.finditer(text):
            uri = resolve(page_src_uri, match.group(2))
            if uri is not None:
                found.append(uri)
        return text

    _outside_code(markdown, collect)
    return found


def on_files(files: Files, config: Any) -> Files:
    """Add a copy of every repository file outside docs/ that a page links to (transitively)."""
    todo = list(files.documentation_pages())
    seen = {f.src_uri for f in files}
    while todo:
        page = todo.pop()
        markdown = Path(page.abs_src_path).read_text(encoding="utf-8")
        for uri in _links(page.src_uri, markdown):
            if uri.startswith(MIRROR + "/") and uri not in seen:
                seen.add(uri)
                mirrored = File.generated(config, uri, abs_src_path=str(REPO / _source_path(uri)))
                files.append(mirrored)
                if uri.endswith(".md"):
                    todo.append(mirrored)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Expand the reference markers; point links out of docs/ at their copies in the site."""
    src_uri = page.file.src_uri
    here = posixpath.dirname(src_uri) or "."

    def rewrite(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            target = match.group(2)
            uri = resolve(src_uri, target)
            if uri is None:
                return match.group(0)
            anchor = target[len(target.partition("#")[0]) :]
            return match.group(1) + posixpath.relpath(uri, here) + anchor + match.group(3)

        return _LINK.sub(one, text)

    if not src_uri.startswith(MIRROR + "/"):
        markdown = expand_markers(markdown)
    return _outside_code(markdown, rewrite)
