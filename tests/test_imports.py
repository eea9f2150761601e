"""No import cycles among workbench modules, function-local imports included (DESIGN.md,
invariant 11): each module's imports are read with ``ast``, nothing is imported."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "workbench"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its name)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.relative_to(PACKAGE).parts:
            continue
        parts = ("workbench", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (in functions too).
    ``from a import b`` counts ``a``, and ``a.b`` where that is a module."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules that import
    each other, found by depth-first search; empty when the graph has none."""
    found: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            found.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_the_cycle_finder_names_a_cycle_and_passes_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from workbench import x\n    from .y import z\n")
    assert imported("workbench.m", tmp_path / "m.py", {"workbench.x", "workbench.y"}) == {
        "workbench.x",
        "workbench.y",
    }


def test_the_graph_knows_the_recipe_and_its_stage():
    graph = import_graph()
    assert "workbench.stage" in graph["workbench.distill"]
    assert "workbench.stage" in graph["workbench.memory"]
    assert "workbench.student" in graph["workbench.modelcard"]


def test_no_import_cycles_among_workbench_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cli_parser_loads_no_pipelines():
    """What the few function-local imports left (of ``workbench.sampling``) are for: building
    the CLI's parser imports every command's module, and loads neither transformers nor
    diffusers' pipelines."""
    heavy = ("transformers", "diffusers.pipelines", "workbench.sampling")
    code = (
        f"import sys, workbench.cli as c; c.build_parser(); print([m for m in {heavy!r} if m in sys.modules])"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
