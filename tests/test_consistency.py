"""A pair's score depends on the pair alone (issue 45): whatever else is in the call (other
documents, their order, their count), whatever ``top_k``, pruning, chunking or threads, every
form scores a query-document pair the same, to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgerank
from edgerank.converters import convert
from tests.conftest import PAIRS, make_bert, make_decoder

QUERY = PAIRS[0][0]
DOCS = [d for _, d in PAIRS] + ["the immune system and the vaccine", "a city of water", "stock market energy",
                                "vaccines, vaccines and the immune system " * 6, "yes", "river river river",
                                "how the market judges the price of energy in a city", "no answer here at all"]
TOLERANCE = 1e-5  # float rounding: padding widths and kernel blockings differ between calls


@pytest.fixture(scope="module", params=["bert", "qwen3"])
def artifact(request, tmp_path_factory, bpe_tokenizer, wordpiece_tokenizer):
    """(int4 artifact with its int8 form, family) of a small random cross-encoder or decoder."""
    root = tmp_path_factory.mktemp(f"consistency-{request.param}")
    if request.param == "bert":
        src, family = make_bert(root / "hf", wordpiece_tokenizer, "classifier", n_layers=4), None
    else:
        src, family = make_decoder(root / "hf", "qwen3", bpe_tokenizer, n_layers=4), "qwen3-reranker"
    convert(src, "onnx", "int4", root / "int4", family=family, verify=False, progress=False)
    return root / "int4", family


def _drift(reranker, full: dict[int, float], order: list[int], top_k: int | None) -> float:
    """The largest |Δscore| of a finally scored document of ``order`` against ``full``."""
    ranking = reranker.rank(QUERY, [DOCS[i] for i in order], top_k=top_k)
    return max((abs(r.score - full[order[r.index]]) for r in ranking if not r.provisional), default=0.0)


@pytest.mark.parametrize("form", ["int4", "int8"])
def test_a_pairs_score_does_not_move_with_its_batch_mates_top_k_pruning_chunks_or_threads(artifact, form):
    path, family = artifact
    with edgerank.Reranker(path, family=family, compute=form, pruning=False) as r:
        full = dict(enumerate(r.score(QUERY, DOCS)))
    # pruning that really drops candidates, chunks of a few rows, one or two threads
    options = [dict(rule="rank", keep={1: 0.5, 2: 0.5}), dict(chunk_tokens=24), dict(threads=1), {}]
    rerankers = [edgerank.Reranker(path, family=family, compute=form, **o) for o in options]

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        order = data.draw(st.permutations(range(len(DOCS))))[: data.draw(st.integers(1, len(DOCS)))]
        top_k = data.draw(st.one_of(st.none(), st.integers(1, len(DOCS))))
        r = rerankers[data.draw(st.integers(0, len(rerankers) - 1))]
        assert _drift(r, full, order, top_k) <= TOLERANCE

    try:
        check()
        pruned = rerankers[0].rank(QUERY, DOCS, top_k=2)
        assert pruned.stats.extra["dropped"] > 0, "the pruning setting must really drop candidates"
    finally:
        for r in rerankers:
            r.close()


def test_the_bf16_form_scores_a_pair_as_alone(artifact, monkeypatch):
    """The bf16 form (OpenVINO) runs every row's products independently too. Forced on any
    CPU (OpenVINO computes fp32 where bf16 is not in hardware), so the verdict does not
    depend on the CPU."""
    import edgerank.runtime.compute as compute

    monkeypatch.setattr(compute, "has_bf16", lambda: True)
    path, family = artifact
    with edgerank.Reranker(path, family=family, compute="bf16", pruning=False) as r:
        full = dict(enumerate(r.score(QUERY, DOCS)))
        assert r.last_stats.extra["compute"]["engine"] == "openvino"
        rng = np.random.default_rng(0)
        for _ in range(10):
            order = list(rng.permutation(len(DOCS))[: int(rng.integers(1, len(DOCS) + 1))])
            assert _drift(r, full, order, None) <= TOLERANCE


@pytest.mark.slow
def test_the_bf16_form_scores_a_real_decoders_pair_as_alone(smollm2_path, tmp_path, monkeypatch):
    """On SmolLM2's real weights OpenVINO's bf16 attention rounds a row differently at another
    padded width: batched at its chunk's width, a pair's score moved by up to 8e-3 between
    calls. Each row runs at its own length's width (``chunking.width_chunks``), batched
    only with rows of that width."""
    import edgerank.runtime.compute as compute
    from edgerank.converters.sample import SAMPLE

    pytest.importorskip("openvino")
    monkeypatch.setattr(compute, "has_bf16", lambda: True)
    convert(smollm2_path, "onnx", "int4", tmp_path / "smol", verify=False, progress=False)
    docs = [p for _, passages in SAMPLE for p in passages]
    rng = np.random.default_rng(0)
    with edgerank.Reranker(tmp_path / "smol", compute="bf16", pruning=False) as r:
        for query, _ in SAMPLE[:2]:
            full = r.score(query, docs)
            assert r.last_stats.extra["compute"]["engine"] == "openvino"
            for _ in range(6):
                order = rng.permutation(len(docs))[: int(rng.integers(1, 12))]
                alone = r.score(query, [docs[i] for i in order])
                assert max(abs(a - full[i]) for a, i in zip(alone, order)) <= TOLERANCE
