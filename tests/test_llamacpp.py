"""llama.cpp backend on the real SmolLM2 GGUF: agrees with the fp32 reference, never needs torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgerank
from edgerank.data.judged import load_beir, load_run
from edgerank.metrics import spearman
from tests.conftest import DL19

pytestmark = pytest.mark.slow


def dl19_pairs(n_queries: int = 5, per_query: int = 10) -> list[tuple[str, list[str]]]:
    coll = load_beir(DL19)
    run = load_run(DL19 / "run.bm25.top100.trec")
    qids = sorted(run)[:n_queries]
    return [(coll.queries[q], [coll.corpus[d] for d, _ in run[q][:per_query]]) for q in qids]


@pytest.mark.skipif(not DL19.is_dir(), reason="needs ../shared/data/trec-dl19")
def test_llamacpp_agrees_with_the_fp32_reference_on_50_dl19_pairs(smollm2_path):
    pairs = dl19_pairs()
    with edgerank.Reranker(smollm2_path, backend="llamacpp") as fast:
        got = np.concatenate([fast.score(q, docs) for q, docs in pairs])
    with edgerank.Reranker(smollm2_path, backend="reference") as ref:
        expected = np.concatenate([ref.score(q, docs) for q, docs in pairs])
    assert len(got) == 50
    rho = spearman(got, expected)
    assert rho >= 0.95, rho
    assert np.max(np.abs(got - expected)) < 0.1


def test_llamacpp_batched_equals_one_sequence_per_decode(smollm2_path):
    docs = ["Vaccines train the immune system.", "The market fell.", "", "A longer passage " * 30,
            "Vaccines train the immune system."]
    with edgerank.Reranker(smollm2_path, backend="llamacpp") as r:
        batched = r.score("how do vaccines work", docs)
    with edgerank.Reranker(smollm2_path, backend="llamacpp", max_sequences=1) as r:
        single = r.score("how do vaccines work", docs)
    assert batched == pytest.approx(single, abs=1e-6)
    assert batched[0] == batched[4]


def test_tokenisation_matches_the_reference_tokenizer(smollm2_path):
    """llama.cpp's tokenizer and transformers' GGUF tokenizer give the same ids."""
    from edgerank.runtime.tokenization import HFTokenizer

    import transformers

    hf = HFTokenizer(transformers.AutoTokenizer.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name).backend_tokenizer)
    texts = ["<|im_start|>user\nHello, world!<|im_end|>", " 1990 (est.) — naïve café", "  two  spaces\n\nnewlines"]
    with edgerank.Reranker(smollm2_path, backend="llamacpp") as r:
        for t in texts:
            assert r._backend.tokenizer.encode(t) == hf.encode(t), t


def test_rank_on_llamacpp_never_imports_torch(smollm2_path):
    code = (
        "import sys, json, edgerank\n"
        f"r = edgerank.rank('how do vaccines work', ['vaccines train immunity', 'stocks'], model={str(smollm2_path)!r})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'n': len(r)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "n": 2}


def test_extra_buffers_are_kept_off_where_llama_cpp_would_use_its_amx_kernels():
    """llama.cpp's AMX matmul crashed on the first decode here (backend module docstring)."""
    from edgerank.runtime.backends.llamacpp import extra_buffers_are_safe

    amx = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    assert not extra_buffers_are_safe(amx)
    assert extra_buffers_are_safe(amx.replace("AMX_INT8 = 1 | ", ""))
    assert extra_buffers_are_safe("CPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 | ")


def test_the_extra_buffer_choice_reaches_llama_cpp_and_can_be_overridden(smollm2_path):
    import llama_cpp

    from edgerank.runtime.backends.llamacpp import extra_buffers_are_safe

    safe = extra_buffers_are_safe(llama_cpp.llama_print_system_info().decode())
    docs = ["Vaccines train the immune system.", "The market fell."]
    with edgerank.Reranker(smollm2_path, backend="llamacpp") as r:
        assert r._backend.extra_buffers is safe
        default = r.score("how do vaccines work", docs)
    with edgerank.Reranker(smollm2_path, backend="llamacpp", extra_buffers=False) as r:
        assert r._backend.extra_buffers is False
        plain = r.score("how do vaccines work", docs)
    assert default == pytest.approx(plain, abs=2e-3)  # repacked or not, the same model
