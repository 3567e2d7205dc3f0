"""No import circles among the project's own files, and the one-way link between the startup hook and the package.

The project's files are the package `root_hf`, the startup hook `_root_hf_autoload` (loaded by `root_hf_autoload.pth`
at interpreter start), `recipes/` and `benchmarks/`. Every `import` statement counts, at module level or inside a
function, with relative imports resolved; `from package import name` is an import of the submodule `package.name`
when there is one, else of `package`. Loading a module by a name held in a string (`importlib.import_module`, as the
lazy `__getattr__` of `root_hf` and the startup hook's `PACKAGE_ENTRY_POINT` do) is not an import statement and is
not counted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("root_hf", "_root_hf_autoload", "recipes", "benchmarks")
STARTUP = "_root_hf_autoload"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of the project's own code."""
    return {_module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def _owner(name: str, modules: set[str]) -> str | None:
    """The project module that importing `name` executes last: `name` itself, else its longest prefix that is one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_statements(path: Path) -> list[tuple[str, list[str]]]:
    """`(module, names)` for every import statement of `path`, relative imports resolved: `import a.b` is
    `("a.b", [])`, `from a import b, c` is `("a", ["b", "c"])`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, [alias.name for alias in node.names]))
    return found


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules that `path` imports."""
    found = set()
    for base, names in import_statements(path):
        submodules = {f"{base}.{n}" for n in names if f"{base}.{n}" in modules}
        found |= submodules
        if not names or len(submodules) < len(names):  # some name is not a submodule: it comes from `base` itself
            found.add(_owner(base, modules))
    return {m for m in found if m is not None and m != _module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_graph_covers_the_package_the_startup_hook_recipes_and_benchmarks():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(ROOTS)
    assert STARTUP in graph["root_hf"]  # the package installs the startup hook's finder
    assert "recipes.assets" in graph["benchmarks.harness"]  # a function-level import, counted


def test_project_has_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_circle_through_a_function_level_import():
    graph = import_graph()
    graph["root_hf.schedules.named"] = graph["root_hf.schedules.named"] | {"benchmarks.harness"}
    assert any("benchmarks.harness" in cycle for cycle in _cycles(graph))


def test_no_import_cycle_runs_through_optim_or_schedules():
    layers = ("root_hf.optim", "root_hf.schedules")
    assert [c for c in _cycles(import_graph()) if any(m.startswith(layers) for m in c)] == []


def test_schedules_import_nothing_above_them():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("root_hf.schedules") and not name.endswith("__main__"):
            assert all(dep.startswith("root_hf.schedules") for dep in deps), (name, deps)


def test_startup_hook_imports_the_standard_library_only():
    """Nothing of root_hf, torch or transformers: the dependency runs from the package to the hook, never back."""
    for name, path in project_files().items():
        if name.split(".")[0] == STARTUP:
            for base, _ in import_statements(path):
                top = base.split(".")[0]
                assert top == STARTUP or top in sys.stdlib_module_names, (name, base)


def test_package_takes_only_public_names_of_the_startup_hook():
    """root_hf imports `_root_hf_autoload` and its modules by their public names and reads no private attribute."""
    for name, path in project_files().items():
        if not name.startswith("root_hf"):
            continue
        aliases = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == STARTUP:
                        assert not any(p.startswith("_") for p in alias.name.split(".")[1:]), (name, alias.name)
                        aliases.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == STARTUP:
                assert not any(p.startswith("_") for p in node.module.split(".")[1:]), (name, node.module)
                for alias in node.names:
                    assert not alias.name.startswith("_"), (name, node.module, alias.name)
                    aliases.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert not node.attr.startswith("_"), (name, f"{node.value.id}.{node.attr}")
