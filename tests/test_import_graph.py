"""The package has no import cycles: every `import` in root_hf/, at module level or inside a function, counted."""

import ast
from pathlib import Path

import root_hf

PACKAGE = Path(root_hf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of root_hf that `path` imports (a `from package import name` counts the submodule `name` if any)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how packages work, not a cycle.
            if node == dep.rpartition(".")[0]:
                continue
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_root_hf_has_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_no_import_cycle_runs_through_optim_or_schedules():
    layers = ("root_hf.optim", "root_hf.schedules")
    assert [c for c in _cycles(import_graph()) if any(m.startswith(layers) for m in c)] == []


def test_schedules_import_nothing_above_them():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("root_hf.schedules") and not name.endswith("__main__"):
            assert all(dep.startswith("root_hf.schedules") for dep in deps), (name, deps)
