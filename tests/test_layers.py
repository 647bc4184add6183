"""The package's floors (docs/module_graph.py): every import, the ones inside functions too,
runs down a floor or stays in its own folder, and no modules import each other in a circle;
the runtime ranks with every tool unimportable, and the core needs neither torch nor
llama.cpp (issues 27, 41)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgerank
from edgerank.converters import convert
from tests.conftest import PAIRS, make_bert

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("module_graph", ROOT / "docs" / "module_graph.py")
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)
# Everything above the front door, and the supply's converting half: what ranking a
# prepared artifact must never need.
TOOLS = ("edgerank.converters", "edgerank.models.cache", "edgerank.data", "edgerank.train", "edgerank.eval",
         "edgerank.calibrate", "edgerank.bench", "edgerank.batch", "edgerank.serve", "edgerank.integrations")


@pytest.mark.core
def test_every_import_runs_down_a_floor_or_stays_in_its_folder():
    graph = module_graph.graph(ROOT)
    assert len(graph) > 50 and sum(len(d) for d in graph.values()) > 200  # the walk found the package
    assert module_graph.upward(graph) == []


@pytest.mark.core
def test_no_modules_import_each_other_in_a_circle():
    assert module_graph.circles(module_graph.graph(ROOT)) == []


@pytest.mark.core
def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    """The checker is not blind: a lazy upward import and a lazy circle, written into a
    copy of two modules, are both found."""
    pkg = tmp_path / "edgerank"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "models").mkdir()
    for f in ("__init__.py", "runtime/__init__.py", "models/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "runtime" / "specs.py").write_text("def f():\n    from edgerank.models import cache\n")
    (pkg / "models" / "cache.py").write_text("from edgerank.runtime import specs\n")
    graph = module_graph.graph(tmp_path)
    assert module_graph.upward(graph) == [("edgerank.runtime.specs", "edgerank.models.cache")]
    assert module_graph.circles(graph) == [["edgerank.models.cache", "edgerank.runtime.specs"]]


@pytest.mark.core
def test_the_package_shows_its_floors_as_folders():
    """At most 16 entries at the top, most of them folders, each one a unit of the floors."""
    top = [p for p in (ROOT / "edgerank").iterdir() if p.name != "__pycache__"]
    assert len(top) <= 16
    assert sum(p.is_dir() for p in top) > len(top) / 2
    units = {u for u, _ in module_graph.FLOORS}
    for p in top:
        name = "edgerank" if p.name in ("__init__.py", "__main__.py") else f"edgerank.{p.name.removesuffix('.py')}"
        assert name in units, f"{p} is no floor's unit (docs/module_graph.py FLOORS)"


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
    from edgerank.runtime import extras

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
    from edgerank.runtime import extras

    with_torch = convert(tiny_qwen3, "onnx", "int4", tmp_path / "a", family="qwen3-reranker", progress=False)
    monkeypatch.setitem(extras.EXTRAS, "reference", ("no_such_module_xyz",))
    without = convert(tiny_qwen3, "onnx", "int4", tmp_path / "b", family="qwen3-reranker", progress=False)
    assert with_torch["reference"] == "reference" and without["reference"] == "edgerank"
    assert without["pairs"] == with_torch["pairs"] == 64
    assert abs(without["spearman"] - with_torch["spearman"]) < 0.02
    assert abs(without["max_abs_diff"] - with_torch["max_abs_diff"]) < 2e-3
