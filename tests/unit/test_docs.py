"""The documents stand alone: nothing in the repository points at a file outside it, and every local link
in the Markdown documents leads to a file that exists."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

# What the project's earlier notes were called; none of them is in the repository.
OUTSIDE = re.compile(r"research/|DESIGN\.md|\.\./shared|seed/|script-api-manual")


def tracked_text_files() -> list[str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [
        n for n in names.splitlines() if n.endswith((".py", ".lua", ".md", ".toml", ".service", ".socket"))
    ]


def test_no_reference_to_a_file_outside_the_repository() -> None:
    found = []
    for name in tracked_text_files():
        if name == "tests/unit/test_docs.py":
            continue
        for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_local_links_in_the_documents_exist() -> None:
    broken = []
    for name in tracked_text_files():
        if not name.endswith(".md"):
            continue
        text = (REPO / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not ((REPO / name).parent / target).exists():
                broken.append(f"{name}: {target}")
    assert not broken, "\n".join(broken)


def test_one_version_everywhere() -> None:
    """The package's version, the distribution's and the changelog's newest release agree."""
    import tomllib

    from deadend import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    newest = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert newest is not None
    assert project["version"] == __version__ == newest.group(1)
