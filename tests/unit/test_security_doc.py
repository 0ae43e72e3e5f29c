"""SECURITY.md cannot go stale silently: every file or folder of the repository it names in backticks
exists (a glob matches something, a `file.py::test_name` names a test defined in that file).

What counts as a path: a backticked token without spaces that is relative and either contains a slash or
ends like one of the repository's text files. Absolute paths (`/dev/null`, `/proc/...`) are the host's and
URLs are not files: neither is checked.
"""

from __future__ import annotations

import re

from tests.conftest import REPO

DOC = REPO / "SECURITY.md"
TOKEN = re.compile(r"`([^`\s]+)`")
ENDINGS = (".py", ".lua", ".md", ".toml", ".socket", ".service")
PATH = re.compile(r"[\w.*/-]+(?:::\w+)?")


def named_paths(text: str) -> list[str]:
    """The repository paths a Markdown text names in backticks, in order."""
    found = []
    for token in TOKEN.findall(text):
        if token.startswith("/") or "://" in token or not PATH.fullmatch(token):
            continue
        path = token.partition("::")[0]
        if "/" in path or path.endswith(ENDINGS):
            found.append(token)
    return found


def missing(token: str) -> str | None:
    """Why `token` does not name something in the repository, or None."""
    path, _, test = token.partition("::")
    matches = sorted(REPO.glob(path.rstrip("/"))) if "*" in path else [REPO / path]
    matches = [m for m in matches if m.exists()]
    if not matches:
        return "no such file or folder"
    if not all(m.resolve().is_relative_to(REPO.resolve()) for m in matches):
        return "outside the repository"
    if path.endswith("/") and not all(m.is_dir() for m in matches):
        return "not a folder"
    if test and not re.search(rf"^(async )?def {re.escape(test)}\(", matches[0].read_text(), re.MULTILINE):
        return f"no test {test} in it"
    return None


def test_the_rule_finds_paths_and_skips_the_rest() -> None:
    text = (
        "`sandbox/worker.py` `tests/data/hostile/cpu_*.lua` `docs/` `README.md` `a.py::test_b` "
        "`/dev/null` `syslog+tls://HOST:PORT` `deadend.log` `--user` `table: 0x0001` `O_EXCL|O_NOFOLLOW`"
    )
    assert named_paths(text) == [
        "sandbox/worker.py",
        "tests/data/hostile/cpu_*.lua",
        "docs/",
        "README.md",
        "a.py::test_b",
    ]


def test_missing_says_why() -> None:
    assert missing("sandbox/worker.py") is None
    assert missing("tests/data/hostile/cpu_*_lying_len.lua") is None
    assert missing("sandbox/child.py") == "no such file or folder"
    assert missing("tests/data/hostile/nothing_*.lua") == "no such file or folder"
    assert missing("..") == "outside the repository"
    assert missing("SECURITY.md/") == "not a folder"
    assert missing("tests/unit/test_security_doc.py::test_missing_says_why") is None
    assert missing("tests/unit/test_security_doc.py::test_nothing") == "no test test_nothing in it"


def test_every_path_security_md_names_exists() -> None:
    paths = named_paths(DOC.read_text())
    assert len(paths) >= 50, paths  # the document names its layers' files: the rule must find them
    assert any(p.startswith("tests/") for p in paths) and any(p.endswith(".lua") for p in paths)
    wrong = [f"{p}: {why}" for p in dict.fromkeys(paths) if (why := missing(p)) is not None]
    assert not wrong, "\n".join(wrong)
