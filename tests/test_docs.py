"""The repository explains itself: every document the code and the docs point at is inside it,
and every such pointer (a docs/ page, a section anchor, a relative link) resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".cpp", ".cu", ".h", ".cuh", ".sh", ".toml", ".txt", ".yaml")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [ROOT / p for p in out if p.endswith(TEXT) or p.startswith(".ci/")]
    return [f for f in files if f.exists()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)}


def test_no_reference_to_documents_outside_the_repository():
    outside = re.compile(r"\b(DESIGN|STYLE|ENVIRONMENT)\.md\b|\.\./shared|/work/shared")
    me = Path(__file__).resolve()
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in _tracked() if f.resolve() != me
           for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
           if outside.search(line)]
    assert not bad, "references to documents the repository does not hold:\n" + "\n".join(bad)


def test_every_docs_reference_resolves():
    ref = re.compile(r"docs/([\w\-]+\.md)(?:#([\w\-]+))?")
    bad = []
    for f in _tracked():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for name, anchor in ref.findall(line):
                doc = ROOT / "docs" / name
                if not doc.exists():
                    bad.append(f"{f.relative_to(ROOT)}:{i}: docs/{name} does not exist")
                elif anchor and anchor not in _anchors(doc):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: docs/{name} has no #{anchor}")
    assert not bad, "\n".join(bad)


def test_relative_markdown_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#([\w\-]+))?\)")
    bad = []
    for f in _tracked():
        if f.suffix != ".md":
            continue
        for target, anchor in link.findall(f.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            dest = (f.parent / target).resolve()
            if not dest.exists():
                bad.append(f"{f.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{f.relative_to(ROOT)}: {target}#{anchor}")
    assert not bad, "\n".join(bad)


def test_architecture_lists_every_module():
    """docs/architecture.md's tables name every module of the three packages."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for pkg in ("dvae_kernels", "dvae", "bench"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name in ("__init__.py", "__main__.py"):
                continue
            rel = f.relative_to(ROOT / pkg).as_posix()
            if f"`{rel}`" not in text and f"`{f.name}`" not in text:
                missing.append(f"{pkg}/{rel}")
    assert not missing, "not in docs/architecture.md: " + ", ".join(missing)
