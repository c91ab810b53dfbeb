"""The package's shape: no import cycles among clipgen's modules (function-level imports count; imports for
type checkers only do not), no two modules sharing a name, and imports at the top of each module unless they
put off a slow or optional package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipgen"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# What a function may import where it runs, not at its module's top: a package that costs 0.3 s or more to
# import after torch (measured on the 2-core CPU: open_clip 2.1, img2dataset 1.6, torchvision 1.2,
# torch-fidelity 1.2, distributed 0.4, matplotlib 0.36), torch itself for a module that has no other need of
# it (the CLI answers --help and config errors at once), optional packages, what the GPU host's bare PyTorch
# image lacks (tests/test_gpu_host.py), and Prefect, which the library never imports. A clipgen module counts
# as what its own top-level imports load.
DEFERRED = {"torch", "open_clip", "img2dataset", "torchvision", "torch_fidelity", "distributed", "matplotlib",
            "triton", "nvidia", "webdataset", "faiss", "prefect", "flows"}


def imported_names(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The modules (clipgen's or third-party) an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        kept = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(kept + ([base] if base else []))
    # `from clipgen.stages import embed` imports a module, `from clipgen.embed import read` a name
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}


def module_imports(module: str) -> tuple[set[str], list[tuple[int, set[str]]]]:
    """What ``module`` imports at its top, and (line, names) for each import inside a function."""
    top: set[str] = set()
    inside: list[tuple[int, set[str]]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                walk(ast.Module(body=child.orelse, type_ignores=[]), in_function)  # only the else runs
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = imported_names(child, module)
                inside.append((child.lineno, names)) if in_function else top.update(names)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(MODULES[module].read_text()), False)
    return top, inside


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        top, inside = module_imports(name)
        loaded = top.union(*(names for _, names in inside))
        graph[name] = {m for m in loaded if m in MODULES} - {name}
    return graph


def deferred_loads(name: str) -> set[str]:
    """The DEFERRED packages that importing ``name`` loads through top-level imports (parents' included)."""
    found, seen, todo = set(), set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.split(".")[0] != "clipgen":
            found |= {current.split(".")[0]} & DEFERRED
        elif current not in MODULES:  # a name inside a module
            todo.append(current.rpartition(".")[0])
        else:
            parts = current.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]
            todo += module_imports(current)[0]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_clipgen_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(module_name(path))
    shared = {stem: found for stem, found in names.items() if len(found) > 1}
    assert not shared, f"modules sharing a name: {shared}"


def needless_deferrals() -> list[str]:
    """Imports inside functions that load nothing DEFERRED beyond what their module has loaded already."""
    needless = []
    for name in sorted(MODULES):
        already = deferred_loads(name)
        for line, names in module_imports(name)[1]:
            if not set().union(*(deferred_loads(n) for n in names)) - already:
                needless.append(f"{MODULES[name].name}:{line} imports {sorted(names)}")
    return needless


def test_imports_sit_at_the_top_unless_they_put_off_a_slow_or_optional_package():
    needless = needless_deferrals()
    assert not needless, "move these to the top of their module:\n" + "\n".join(needless)


def test_a_needless_import_inside_a_function_is_found(tmp_path, monkeypatch):
    module = tmp_path / "made_up.py"
    module.write_text("import json\n\n\ndef light():\n    from clipgen.data.world import SHAPES\n\n\n"
                      "def slow():\n    import open_clip\n\n\ndef torch_here():\n    import torch\n")
    monkeypatch.setitem(MODULES, "clipgen.made_up", module)
    assert needless_deferrals() == ["made_up.py:5 imports ['clipgen.data.world']"]
    assert deferred_loads("clipgen.cli") == set()  # the CLI answers --help and config errors without torch
