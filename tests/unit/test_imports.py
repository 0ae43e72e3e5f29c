"""Imports flow one way, and no two modules import each other (read from the source with ast).

sandbox/            the worker side: imports only the wire contract (deadend.wire)
deadend/ (ground)   wire, options, config, logs, events, reasons, proxy, scripts, recording, ...
broker/             the asyncio side: imports the ground floor
deadend/ (front)    the command line and the tools: above both, imported by nothing
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("deadend", "broker", "sandbox")
FRONT = {"deadend.cli", "deadend.tools", "deadend.replay", "deadend.__main__"}
# The one credential switch both the zygote and the broker make (setgroups, setres[ug]id, checked) has its
# home beside the zygote's lockdown; the broker imports that, and nothing else of the worker side.
BROKER_MAY_IMPORT_FROM_SANDBOX = {"sandbox.lockdown"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every internal module `path` imports, at module level or inside a function. `from deadend import
    wire` imports deadend.wire (the package's own __init__ holds only the version)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def layer(module: str) -> str:
    if module in ("deadend.wire", "deadend"):  # the package itself: its version only
        return "wire"
    if module in FRONT:
        return "front"
    return module.split(".")[0]  # deadend (the ground floor), broker, sandbox


ALLOWED = {
    "wire": {"wire"},
    "sandbox": {"sandbox", "wire"},
    "deadend": {"deadend", "wire"},
    "broker": {"broker", "deadend", "wire"},
    "front": {"front", "broker", "deadend", "wire", "sandbox"},
}


def test_imports_flow_one_way() -> None:
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            ok = layer(target) in ALLOWED[layer(source)] or (
                layer(source) == "broker" and target in BROKER_MAY_IMPORT_FROM_SANDBOX
            )
            if not ok:
                wrong.append(f"{source} ({layer(source)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_front_door() -> None:
    for source, targets in graph().items():
        if layer(source) != "front":
            assert not targets & FRONT, f"{source} imports {targets & FRONT}"


def test_no_cycles() -> None:
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for target in sorted(edges.get(node, ())):
            if seen.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in seen:
                visit(target, [*path, target])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])


def test_the_scan_sees_the_imports() -> None:
    """A guard against a scan that finds nothing (and so passes whatever the code does)."""
    edges = graph()
    assert "deadend.wire" in edges["sandbox.worker"]
    assert "broker.pool" in edges["broker.dense"]
    assert "deadend.tools" in edges["deadend.cli"]  # a lazy import, inside a function
    assert "deadend.sinks.spool" in edges["deadend.sinks"]  # subpackages are walked too
    assert sum(len(t) for t in edges.values()) > 80
