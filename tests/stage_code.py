"""Which code each pipeline step runs, and a digest of it that comments and docstrings do not change.

Steps keep explicit ``code_version`` strings (clipgen/pipeline.py), so that a refactor never throws away a
user's caches. ``tests/stage_code.json`` records, for each step, its version and the digest of the code it
ran at that version; ``test_stage_code.py`` fails when the code changes and the version does not. The one
who changed the code then decides:

- the step's output can change: bump its ``code_version`` and record (caches are rebuilt);
- it cannot (a rename, a faster path with the same bytes): record only (caches are kept).

Record with ``python tests/stage_code.py``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("stage_code.json")
# Modules that shape how a run is driven, not what a step writes: the config's values (presets included)
# are hashed into the ids already, and locking, checks and the CLI cannot change an output's bytes.
DRIVING = {"clipgen.config", "clipgen.presets", "clipgen.validate", "clipgen.preflight", "clipgen.errors",
           "clipgen.cli", "clipgen.pipeline", "clipgen.fanout", "clipgen.artifacts", "clipgen.cores"}


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST, package: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from clipgen.data import world`
    return {name for name in found if name.startswith("clipgen")}


def closure(start: str) -> list[str]:
    """``start`` and every clipgen module it imports, at any depth (function-level imports included)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None or name in DRIVING:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(_imports(ast.parse(path.read_text()), package))
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # a package's __init__ runs on import
    return sorted(seen)


def normalised(source: str) -> str:
    """The module's code without comments or docstrings, as ``ast.unparse`` writes it (stabler across Python
    versions than ``ast.dump``, whose fields grow with the grammar)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def step_code(step) -> tuple[list[str], str]:
    """The modules a step runs (from its builder's module) and one digest over their normalised ASTs."""
    modules = closure(step.build.__module__)
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + normalised(module_file(name).read_text()).encode() + b"\0")
    return modules, h.hexdigest()[:16]


@functools.cache
def current() -> dict[str, dict]:
    from clipgen.pipeline import STEPS

    return {s.name: {"code_version": s.code_version, "digest": step_code(s)[1]} for s in STEPS}


def record() -> None:
    RECORD.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
    print(f"recorded {RECORD}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    record()
