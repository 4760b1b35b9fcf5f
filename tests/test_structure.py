"""The package's structure: its import graph has no circles, and no room imports a room above it (kernels -> tokens
-> models / data -> engine -> tasks -> pretraining / fine-tuning -> orchestration -> CLI)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: The rooms of the package, lowest first; a module may import its own room and the rooms below it.
LEVELS = {
    "mal._version": 0, "mal.io": 0, "mal.config": 0, "mal.runtime": 0,
    "mal.kernels": 1,
    "mal.tokens": 2,
    "mal.models": 3, "mal.data": 3,
    "mal.engine": 4,
    "mal.tasks": 5,
    "mal.pretrain": 6, "mal.finetune": 6,
    "mal.hub": 7, "mal.runs": 7,
    "mal.cli": 8, "mal": 8,
}  # fmt: skip
#: Rooms of one level that must not import each other.
APART = [("mal.pretrain", "mal.finetune"), ("mal.models", "mal.data")]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "mal").rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The ``mal`` modules a file imports, anywhere in it (function-level imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def room(module: str) -> str:
    return max((r for r in LEVELS if module == r or module.startswith(r + ".")), key=len)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def test_every_module_is_in_a_room():
    assert all(room(m) for m in modules())


def test_the_import_graph_has_no_circles():
    g = graph()
    # Tarjan's strongly connected components: a circle is a component of more than one module
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_room_imports_a_room_above_it():
    bad = []
    for m, targets in graph().items():
        for t in targets:
            if LEVELS[room(t)] > LEVELS[room(m)]:
                bad.append(f"{m} -> {t}")
            if any({room(m), room(t)} == set(pair) for pair in APART):
                bad.append(f"{m} -> {t} (rooms kept apart)")
    assert bad == []


@pytest.mark.parametrize("room_name", ["mal.engine", "mal.models", "mal.tokens", "mal.kernels"])
def test_the_engine_and_the_lower_rooms_import_no_model_task_or_stage(room_name):
    forbidden = {"mal.engine": ("mal.models", "mal.tasks", "mal.pretrain", "mal.finetune")}.get(
        room_name, ("mal.data", "mal.engine", "mal.tasks", "mal.pretrain", "mal.finetune")
    )
    bad = [f"{m} -> {t}" for m, ts in graph().items() if room(m) == room_name for t in ts if room(t) in forbidden]
    assert bad == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and an upward import are found."""
    pkg = tmp_path / "mal"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("from mal.engine import loop\n")
    (pkg / "engine.py").write_text("def f():\n    from mal.kernels import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    g = graph()
    assert g["mal.kernels"] == {"mal.engine"} and g["mal.engine"] == {"mal.kernels"}
    assert LEVELS[room("mal.engine")] > LEVELS[room("mal.kernels")]
