"""The package's floors: the runtime ranks with none of the tools importable, imports no
tool at module level, and the core needs neither torch nor llama.cpp (issue 27)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import edgerank
from edgerank.converters import convert
from tests.conftest import PAIRS, make_bert

ROOT = Path(__file__).resolve().parents[1] / "edgerank"
# The tools: each is a command or a library on top of the runtime, never under it.
TOOLS = ("edgerank.converters", "edgerank.train", "edgerank.data", "edgerank.eval", "edgerank.calibrate",
         "edgerank.bench", "edgerank.pull", "edgerank.cache", "edgerank.models", "edgerank.recipes",
         "edgerank.adapters", "edgerank.losses", "edgerank.datasets", "edgerank.serve",
         "edgerank.integrations", "edgerank.batch", "edgerank.readouts_fit", "edgerank.peers")
# The runtime: what a rank() call on a prepared artifact runs.
RUNTIME = ("edgerank", "edgerank.api", "edgerank.tokenization", "edgerank.specs", "edgerank.catalog",
           "edgerank.artifact", "edgerank.layout", "edgerank.sources", "edgerank.backends",
           "edgerank.backends.heads", "edgerank.backends.layerwise", "edgerank.backends.generate",
           "edgerank.explain", "edgerank.backends.reference",
           "edgerank.backends.llamacpp", "edgerank.pruning", "edgerank.budget", "edgerank.streaming",
           "edgerank.embedding", "edgerank.chunking", "edgerank.rope", "edgerank.memory", "edgerank.errors",
           "edgerank.extras", "edgerank.metrics", "edgerank.supply", "edgerank.readouts", "edgerank.compute")


def _module_file(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    return ROOT / rel / "__init__.py" if (ROOT / rel).is_dir() else (ROOT / rel).with_suffix(".py")


def top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside a function)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_runtime_module_imports_a_tool_when_it_is_imported():
    for name in RUNTIME:
        bad = {m for m in top_level_imports(_module_file(name)) if m.startswith(TOOLS)}
        assert not bad, f"{name} imports the tools {bad}"


def test_only_the_supply_door_reaches_the_tools_from_the_runtime():
    """Lazily, the runtime reaches the tools through ``edgerank.supply`` alone."""
    for name in RUNTIME:
        if name == "edgerank.supply":
            continue
        tree = ast.parse(_module_file(name).read_text())
        lazy = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        bad = {m for m in lazy if m.startswith(TOOLS)}
        assert not bad, f"{name} reaches the tools {bad} directly, not through edgerank.supply"


def test_the_runtime_ranks_a_prepared_artifact_with_every_tool_unimportable(tmp_path, wordpiece_tokenizer):
    src = make_bert(tmp_path / "hf", wordpiece_tokenizer, "classifier")
    art = tmp_path / "art"
    convert(src, "onnx", "int4", art, verify=False, progress=False)
    with edgerank.Reranker(art) as r:
        expected = r.score(PAIRS[0][0], [d for _, d in PAIRS])
    code = (
        "import json, sys\n"
        f"for tool in {TOOLS!r}:\n"
        "    sys.modules[tool] = None  # any import of it raises ImportError\n"
        "import edgerank\n"
        f"r = edgerank.rank({PAIRS[0][0]!r}, {[d for _, d in PAIRS]!r}, model={str(art)!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]\n"
        "print(json.dumps({'scores': {x.index: x.score for x in r}, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    scores = np.array([got["scores"][str(i)] for i in range(len(PAIRS))])
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_a_missing_extra_is_one_error_naming_the_install_that_fixes_it(monkeypatch, tiny_qwen3):
    from edgerank import extras

    monkeypatch.setitem(extras.EXTRAS, "reference", ("torch", "no_such_module_xyz"))
    try:
        edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker")
    except edgerank.MissingExtraError as e:
        assert "no_such_module_xyz" in str(e) and "pip install 'edgerank[reference]'" in str(e)
        assert isinstance(e, ImportError) and isinstance(e, edgerank.BackendUnavailableError)
    else:
        raise AssertionError("a missing extra must be refused")


def test_without_torch_a_conversion_is_verified_against_an_fp32_artifact(monkeypatch, tmp_path, tiny_qwen3):
    """On the core install the converter's check runs the source as an fp32 artifact on
    ONNX Runtime; its figures match the check against transformers."""
    from edgerank import extras

    with_torch = convert(tiny_qwen3, "onnx", "int4", tmp_path / "a", family="qwen3-reranker", progress=False)
    monkeypatch.setitem(extras.EXTRAS, "reference", ("no_such_module_xyz",))
    without = convert(tiny_qwen3, "onnx", "int4", tmp_path / "b", family="qwen3-reranker", progress=False)
    assert with_torch["reference"] == "reference" and without["reference"] == "edgerank"
    assert without["pairs"] == with_torch["pairs"] == 64
    assert abs(without["spearman"] - with_torch["spearman"]) < 0.02
    assert abs(without["max_abs_diff"] - with_torch["max_abs_diff"]) < 2e-3
