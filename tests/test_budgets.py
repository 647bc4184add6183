"""``max_memory_mb`` means what it says (issue 42): acceptance only grows with the budget,
the size a ``MemoryBudgetError`` names runs the call, and the memory the model adds to the
process, sampled from outside it, stays within the budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import edgerank
from edgerank.converters import convert
from edgerank.converters.sample import SAMPLE
from edgerank.runtime.budget import MemoryBudgetError
from tests.conftest import make_decoder

REPO = Path(__file__).resolve().parents[1]
QUERY, DOCS = SAMPLE[0][0], [d for _, docs in SAMPLE for d in docs]  # 64 passages, no judged data needed
CHILD = r"""
import json, sys
import numpy as np, onnxruntime, tokenizers, psutil
import edgerank
from edgerank.runtime.backends.layerwise import LayerwiseBackend
args = json.loads(sys.stdin.readline())
print("ready", flush=True)
sys.stdin.readline()
with edgerank.Reranker(args["model"], backend="edgerank", **args["options"]) as r:
    n = len(r.rank(args["query"], args["docs"], top_k=10))
print("done", n, flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module", params=["minilm-l6", "qwen3"])
def model(request, tmp_path_factory, bpe_tokenizer) -> tuple[Path, str | None]:
    """The real default model's artifact, and a small random decoder's."""
    if request.param == "minilm-l6":
        from edgerank.models.cache import cached_artifact
        from edgerank.models.supply import resolve

        return cached_artifact(resolve("minilm-l6"), progress=False), None
    root = tmp_path_factory.mktemp("budget-qwen3")
    src = make_decoder(root / "hf", "qwen3", bpe_tokenizer, n_layers=4)
    convert(src, "onnx", "int4", root / "int4", family="qwen3-reranker", verify=False, progress=False)
    return root / "int4", "qwen3-reranker"


def _runs(model: tuple[Path, str | None], budget: float) -> bool | str:
    """True if ``budget`` loads the model and ranks the call, else the error's message."""
    path, family = model
    try:
        with edgerank.Reranker(path, family=family, max_memory_mb=budget) as r:
            r.rank(QUERY, DOCS, top_k=10)
        return True
    except MemoryBudgetError as e:
        return str(e)


def _named(message: str) -> int:
    return int(re.search(r"needs (?:at least )?~(\d+)", message).group(1))


def _statm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model_added_peak(path: Path, options: dict) -> float:
    """The peak RSS a child gains while loading the model and ranking, sampled by this
    process from /proc (nothing the child reports about itself)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps({"model": str(path), "options": options, "query": QUERY, "docs": DOCS}) + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    base = peak = _statm_mb(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.append(proc.stdout.readline()), daemon=True)
    reader.start()
    while reader.is_alive():  # sample until the child says the call is over
        peak = max(peak, _statm_mb(proc.pid))
        time.sleep(0.001)
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    proc.wait(timeout=60)
    assert said == ["done 10\n"], said
    return peak - base


def _smallest(model) -> int:
    """The size the errors name: the model's at load (no call is known yet), then, if that
    refuses the call, the call's, which must run it (on da04390, minilm-l6 named 65, 79, 82
    and 83 in turn before 84 ran)."""
    refused = _runs(model, 1)
    assert isinstance(refused, str)
    need = _named(refused)
    verdict = _runs(model, need)
    if verdict is not True:
        need = _named(verdict)
        assert _runs(model, need) is True, f"the size named for the call, {need} MB, refused it"
    return need


def test_the_named_size_runs_one_less_does_not_and_every_larger_budget_runs(model):
    need = _smallest(model)
    assert isinstance(_runs(model, need - 1), str)
    grid = sorted({need + d for d in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)} | {int(need * f) for f in (1.5, 2, 3, 5)})
    refused_above = [b for b in grid if _runs(model, b) is not True]
    assert refused_above == [], f"accepted at {need} MB, refused at {refused_above}"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_the_memory_the_model_adds_stays_within_the_budget(model):
    path, family = model
    need = _smallest(model)
    for budget in (need, need * 1.5, need * 3):
        added = _model_added_peak(path, {"max_memory_mb": budget, "family": family})
        assert added <= budget, f"budget {budget:.0f} MB, the model added {added:.1f} MB"
