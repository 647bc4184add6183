"""The conversion check's built-in sample: its verdict rests on scores that are spread out,
not on near-ties that a rounding error reorders (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import edgerank
from converters.sample import SAMPLE
from converters.verify import compare
from edgerank.metrics import kendall_tau, spearman

# The 8-pair sample the check fell back to before (issue 26), kept here as the example of
# what not to rest a verdict on.
OLD_SAMPLE = [
    ("how do vaccines train the immune system", [
        "Vaccines expose the immune system to a harmless piece of a pathogen so it learns to respond.",
        "The stock market closed higher on Friday after strong earnings.",
        "Memory B cells keep antibodies ready after a booster shot.",
        "Rivers carry sediment from mountains to the sea.",
    ]),
    ("what is the capital of france", [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
        "The Seine flows through Paris.",
        "Croissants are a French pastry.",
    ]),
]

# The size of a sound 8-bit conversion's error on these scores: llama.cpp q8_0 against
# fp32 SmolLM2 differed by up to 0.030 on the old sample (issue 26's report).
CONVERSION_ERROR = 0.03


def worst_spearman_under_noise(scores: np.ndarray, eps: float, trials: int = 300) -> float:
    """The lowest Spearman between ``scores`` and ``scores`` + uniform noise in [-eps, eps]
    over ``trials`` seeded draws: how far a conversion error of that size can move the
    check's verdict on these scores."""
    rng = np.random.default_rng(0)
    return min(spearman(scores, scores + rng.uniform(-eps, eps, scores.shape)) for _ in range(trials))


def reference_scores(model: str, sample) -> np.ndarray:
    with edgerank.Reranker(model, backend="reference") as r:
        return np.concatenate([r.score(q, docs) for q, docs in sample])


def test_the_sample_is_large_and_each_query_has_relevant_and_unrelated_passages():
    assert len(SAMPLE) >= 8 and sum(len(d) for _, d in SAMPLE) >= 64
    assert all(len(docs) == 8 and len(set(docs)) == 8 for _, docs in SAMPLE)
    # the three relevant passages of a query are unrelated passages of no other query
    first_three = {d for _, docs in SAMPLE for d in docs[:3]}
    assert all(d not in first_three for _, docs in SAMPLE for d in docs[3:])


def test_compare_reports_tie_aware_figures_against_scipy():
    class Fixed:  # two "rerankers" returning fixed scores
        def __init__(self, table): self.table = table
        def score(self, query, docs): return np.asarray(self.table[query], dtype=float)

    ref = {"a": [0.9, 0.1, 0.5, 0.5], "b": [0.2, 0.3, 0.8, 0.4]}
    got = {"a": [0.8, 0.2, 0.5, 0.6], "b": [0.1, 0.3, 0.7, 0.45]}
    pairs = [("a", ["x"] * 4), ("b", ["x"] * 4)]
    report = compare(Fixed(ref), Fixed(got), pairs)
    r, g = np.concatenate(list(ref.values())), np.concatenate(list(got.values()))
    assert report["kendall_tau_b"] == pytest.approx(stats.kendalltau(r, g).statistic)
    assert report["spearman"] == pytest.approx(stats.spearmanr(r, g).statistic)
    assert report["diff_over_spread"] == pytest.approx(np.sqrt(np.mean((r - g) ** 2)) / np.std(r))
    assert compare(Fixed(ref), Fixed(ref), pairs)["diff_over_spread"] == 0


@pytest.mark.slow
def test_a_conversion_sized_error_cannot_move_the_verdict_on_the_new_sample(smollm2_path):
    """On zero-shot SmolLM2's own fp32 scores, noise the size of a q8_0 conversion's error
    drags Spearman on the old 8-pair sample far below the 0.95 the round trip asserts;
    on the new sample it cannot."""
    old = worst_spearman_under_noise(reference_scores("smollm2-135m", OLD_SAMPLE), CONVERSION_ERROR)
    new = worst_spearman_under_noise(reference_scores("smollm2-135m", SAMPLE), CONVERSION_ERROR)
    assert old < 0.9, old  # the old sample: a verdict by luck
    assert new >= 0.97, new


@pytest.mark.slow
@pytest.mark.parametrize("to,quant", [("gguf", "q8_0"), ("onnx", "int4")])
def test_smollm2_round_trips_rank_like_the_source_on_the_builtin_sample(smollm2_path, tmp_path, monkeypatch,
                                                                         to, quant):
    """Verified on the built-in sample whether or not ../shared is beside the checkout, so
    this verdict is the same on every machine."""
    import converters.verify as verify

    monkeypatch.setattr(verify, "DL19", tmp_path / "absent")
    out = tmp_path / ("s.gguf" if to == "gguf" else "s")
    report = edgerank_convert(smollm2_path, to, quant, out)
    assert report["pairs"] == 64
    assert report["spearman"] >= 0.95 and report["kendall_tau_b"] >= 0.85, report
    assert report["diff_over_spread"] <= 0.3, report


def edgerank_convert(src, to, quant, out):
    from converters import convert

    return convert(src, to, quant, out, progress=False)
