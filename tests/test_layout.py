"""The package's rooms: no import cycle, and every import runs downwards.

Every module of ``src/nonlocalnet`` is parsed (not imported); its imports, at module level and
inside functions, form a graph. The rules are the table of docs/ARCHITECTURE.md:

    functional ← layers ← models ← convert ← engine ← apps ← cli   (data and viz beside models)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nonlocalnet"

#: room -> rooms (top-level modules or subpackages of nonlocalnet) it may import.
ALLOWED: dict[str, set[str]] = {
    "_checks": set(),
    "functional": {"_checks"},
    "layers": {"_checks", "functional", "layers"},
    "analysis": {"_checks", "functional", "layers"},
    "__init__": {"_checks", "functional", "layers", "analysis"},
    "data": {"_checks", "data"},
    "models": {"_checks", "functional", "layers", "models"},
    "viz": {"_checks", "functional", "layers", "analysis", "models", "data", "viz"},
    "convert": {"_checks", "functional", "layers", "models", "convert"},
    "engine": {"_checks", "functional", "layers", "analysis", "models", "data", "convert"}
    | {"engine"},
    "apps": {"_checks", "functional", "layers", "analysis", "models", "data", "viz", "convert"}
    | {"engine"},
    "cli": {"_checks", "functional", "layers", "analysis", "models", "data", "viz", "convert"}
    | {"engine", "apps", "cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (explicit imports only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import obj` imports mod
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_the_parser_sees_the_imports() -> None:
    graph = _graph()
    assert "nonlocalnet.layers.nonlocal_block" in graph["nonlocalnet.layers.registry"]
    assert "nonlocalnet.functional" in graph["nonlocalnet.layers.nonlocal_block"]
    assert "nonlocalnet.engine.train" in graph["nonlocalnet.cli.train"]  # inside a function


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_run_downwards() -> None:
    bad = []
    for module, targets in _graph().items():
        room = _room(module)
        assert room in ALLOWED, f"{module}: room {room!r} is not in the table"
        for target in targets:
            if target == "nonlocalnet":
                bad.append(f"{module} -> nonlocalnet (import from the submodule instead)")
            elif _room(target) not in ALLOWED[room] | {room}:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the rooms' order:\n" + "\n".join(bad)


def test_only_the_cli_parses_arguments() -> None:
    offenders = [
        name
        for name, path in _modules().items()
        if _room(name) != "cli" and "argparse" in _third_party(path)
    ]
    assert not offenders, f"argparse outside nonlocalnet.cli: {offenders}"


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_blocks_need_torch_alone() -> None:
    stdlib_ok = {"__future__", "collections", "contextlib", "dataclasses", "functools", "math"}
    stdlib_ok |= {"typing", "itertools", "warnings", "logging"}
    for name, path in _modules().items():
        if _room(name) in {"_checks", "functional", "layers", "analysis"}:
            extra = _third_party(path) - stdlib_ok - {"torch", "nonlocalnet"}
            assert not extra, f"{name} imports {sorted(extra)}"


def test_configs_of_the_checkout_are_the_shipped_ones() -> None:
    checkout = SRC.parent / "configs"
    shipped = PACKAGE / "configs"
    assert checkout.resolve() == shipped.resolve() or sorted(
        (p.name, p.read_bytes()) for p in checkout.glob("*.yaml")
    ) == sorted((p.name, p.read_bytes()) for p in shipped.glob("*.yaml"))
    assert (shipped / "demo_c2d.yaml").is_file() and (shipped / "demo_nl_c2d.yaml").is_file()
