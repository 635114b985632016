"""Fails when the package's modules import each other in a circle.

Reads every module of sparsemom_ext with ``ast`` (nothing is imported), collects its
imports of other sparsemom_ext modules, at module level and inside functions alike (a
lazy import is a dependency all the same), and looks for a cycle. Importing a
submodule also runs its package's ``__init__``, but that is not an edge here: a package
that re-exports its submodules would otherwise be a cycle with each of them.

    python scripts/check_imports.py        # exit 1 and the cycle, or exit 0
"""

import ast
import sys
from pathlib import Path

PACKAGE = "sparsemom_ext"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set) -> set:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` depends on a.b when that is a module, else on a.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    paths = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(p, root): p for p in paths}
    graph = {name: imports_of(path, name, set(names)) for name, path in names.items()}
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle: " + " -> ".join(cycle))
        return 1
    print(f"no import cycle among {len(names)} modules of {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
