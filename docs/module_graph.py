"""Print the package's module picture: each module, its lines, and the project modules it
imports (at import time, or lazily inside a function, marked ``*``).

    python docs/module_graph.py [ROOT] [--path-from edgerank.api]

``--path-from M`` also prints the shortest chain of module imports from ``M`` to a module
that calls ``InferenceSession.run`` (how many files a reader crosses from ``rank()`` to the
kernels)."""

from __future__ import annotations

import argparse
import ast
from collections import deque
from pathlib import Path

PACKAGES = ("edgerank", "converters", "models")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, bool]:
    """Project modules ``name`` imports -> whether the import is lazy (inside a function)."""
    tree = ast.parse(path.read_text())
    found: dict[str, bool] = {}

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        pkg = name.split(".")[: -child.level] if not path.name == "__init__.py" else \
                            name.split(".")[: len(name.split(".")) - child.level + 1]
                        base = ".".join(pkg + ([base] if base else []))
                    targets = [base] + [f"{base}.{a.name}" for a in child.names]
                for t in targets:
                    while t and t not in known:
                        t = t.rpartition(".")[0]
                    if t and t != name:
                        found[t] = found.get(t, True) and lazy
            visit(child, inner)

    visit(tree, False)
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", default=".")
    p.add_argument("--path-from", default=None)
    args = p.parse_args()
    root = Path(args.root)
    known = modules(root)
    graph = {m: imports(m, f, known) for m, f in known.items()}
    total = 0
    print("| module | lines | imports (* = lazily, inside a function) |\n| --- | --- | --- |")
    for m, f in known.items():
        n = len(f.read_text().splitlines())
        total += n
        deps = ", ".join(f"{d}{'*' if lazy else ''}" for d, lazy in sorted(graph[m].items()))
        print(f"| `{m}` | {n} | {deps} |")
    print(f"\n{len(known)} modules, {total} lines")
    if args.path_from:
        sinks = {m for m, f in known.items() if ".run(" in f.read_text() and "InferenceSession" in
                 "".join(known[d].read_text() for d in [m, *graph[m]])}
        prev, todo = {args.path_from: None}, deque([args.path_from])
        while todo:
            m = todo.popleft()
            if m in sinks:
                chain = []
                while m:
                    chain.append(m)
                    m = prev[m]
                print(f"\nrank() to InferenceSession.run: {len(chain)} files: {' -> '.join(reversed(chain))}")
                break
            for d in graph[m]:
                if d not in prev:
                    prev[d] = m
                    todo.append(d)


if __name__ == "__main__":
    main()
