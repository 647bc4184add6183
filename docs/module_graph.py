"""The package's import graph, counted with the imports inside functions, and its floors.

    python docs/module_graph.py [ROOT] [--path-from edgerank]

prints every module, its lines and the project modules it imports (``*``: only lazily,
inside a function), then the import circles and the upward imports (both must be none;
``tests/test_layers.py`` checks it). ``--path-from M`` also prints the shortest chain of
imports from ``M`` to a module that calls ``InferenceSession.run``.

The floors, lowest first. A module may import a module of a lower floor, or one of its own
unit (folder); nothing else. A command line (``X.__main__``) is an application, whatever
folder it sits in: it may import anything below the top floor.
"""

from __future__ import annotations

import argparse
import ast
from collections import deque
from pathlib import Path

# (unit, what it holds); a module belongs to the longest unit that prefixes its name
FLOORS: list[tuple[str, str]] = [
    ("edgerank.errors", "the errors edgerank raises, and the checks of API arguments"),
    ("edgerank.metrics", "ranking metrics and rank correlations"),
    ("edgerank.cli", "what the command lines share: argument types, one-line errors, output checks, tables"),
    ("edgerank.runtime", "ranks an already-resolved model: specs, tokenization, the artifact, layer sessions, "
                         "compute forms, pruning, budget, backends, the runtime Reranker"),
    ("edgerank.converters", "trained models to GGUF and edgerank artifacts, verified with the runtime"),
    ("edgerank.models", "model supply: built-ins pulled from PyPI, what model= names, the conversion cache"),
    ("edgerank", "the front door: rank() and Reranker(model=NAME)"),
    ("edgerank.data", "judged collections (BEIR, TREC runs, BM25) and training sets"),
    ("edgerank.train", "fine-tuning on the reference path, and recipes"),
    ("edgerank.eval", "reranking a run on judged data and scoring it"),
    ("edgerank.calibrate", "readout fitting and pruning calibration"),
    ("edgerank.bench", "the benchmark and its peers"),
    ("edgerank.batch", "application: a run file reranked in processes or on Ray"),
    ("edgerank.serve", "application: the HTTP server"),
    ("edgerank.integrations", "application: LangChain and LlamaIndex"),
    ("__main__", "application: the command lines"),
]
TOP = {"edgerank.batch", "edgerank.serve", "edgerank.integrations", "__main__"}  # one floor, side by side


def modules(root: Path) -> dict[str, Path]:
    """Every module of the ``edgerank`` package under ``root``, by dotted name."""
    out = {}
    for f in sorted((root / "edgerank").rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, bool]:
    """Project modules ``name`` imports -> whether only lazily (inside a function)."""
    tree = ast.parse(path.read_text())
    found: dict[str, bool] = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    # ``from P import x``: x is a module of P when there is one, else a name in P
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
                for t in targets:
                    while t and t not in known:
                        t = t.rpartition(".")[0]
                    if t and t != name:
                        found[t] = found.get(t, True) and lazy
            visit(child, inner)

    visit(tree, False)
    return found


def graph(root: Path) -> dict[str, dict[str, bool]]:
    known = modules(root)
    return {m: imports(m, f, known) for m, f in known.items()}


def unit(module: str) -> str:
    """The floor unit ``module`` belongs to."""
    if module.endswith(".__main__"):
        return "__main__"
    units = [u for u, _ in FLOORS if u != "__main__" and (module == u or module.startswith(u + "."))]
    return max(units, key=len)


def floor(module: str) -> int:
    u = unit(module)
    return len(FLOORS) if u in TOP else [f for f, _ in FLOORS].index(u)


def upward(g: dict[str, dict[str, bool]]) -> list[tuple[str, str]]:
    """Imports that do not run down a floor (nor stay inside their own unit)."""
    return sorted((m, d) for m, deps in g.items() for d in deps
                  if unit(d) != unit(m) and floor(d) >= floor(m) and not _own_command(m, d))


def _own_command(module: str, imported: str) -> bool:
    """A command line (``P.__main__``) runs its own package P."""
    package = module.removesuffix(".__main__")
    return module.endswith(".__main__") and (imported == package or imported.startswith(package + "."))


def circles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in g:
        if v not in index:
            strong(v)
    return out


def path_to_kernels(root: Path, g: dict[str, dict[str, bool]], start: str) -> list[str]:
    """The shortest import chain from ``start`` to a module that calls ``InferenceSession.run``."""
    known = modules(root)
    sinks = {m for m, f in known.items() if "sess.run(" in f.read_text()}
    prev: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        m = todo.popleft()
        if m in sinks:
            chain = []
            while m:
                chain.append(m)
                m = prev[m]
            return list(reversed(chain))
        for d in g[m]:
            if d not in prev:
                prev[d] = m
                todo.append(d)
    return []


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", default=".")
    p.add_argument("--path-from", default=None)
    args = p.parse_args()
    root = Path(args.root)
    known = modules(root)
    g = graph(root)
    total = 0
    print("| module | lines | imports (* = lazily, inside a function) |\n| --- | --- | --- |")
    for m, f in known.items():
        n = len(f.read_text().splitlines())
        total += n
        deps = ", ".join(f"{d}{'*' if lazy else ''}" for d, lazy in sorted(g[m].items()))
        print(f"| `{m}` | {n} | {deps} |")
    edges = sum(len(d) for d in g.values())
    print(f"\n{len(known)} modules, {total} lines, {edges} imports; "
          f"circles: {circles(g) or 'none'}; upward imports: {upward(g) or 'none'}")
    if args.path_from:
        chain = path_to_kernels(root, g, args.path_from)
        print(f"\n{args.path_from} to InferenceSession.run: {len(chain)} files: {' -> '.join(chain)}")


if __name__ == "__main__":
    main()
