"""The conversion check's built-in sample: its verdict rests on scores that are spread out,
not on near-ties that a rounding error reorders (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import edgerank
from tests.conftest import DL19
from edgerank.converters.__main__ import MIN_SPEARMAN
from edgerank.converters.sample import SAMPLE
from edgerank.converters.verify import compare
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


@pytest.mark.core
def test_the_sample_is_large_and_each_query_has_relevant_and_unrelated_passages():
    assert len(SAMPLE) >= 8 and sum(len(d) for _, d in SAMPLE) >= 64
    assert all(len(docs) == 8 and len(set(docs)) == 8 for _, docs in SAMPLE)
    # the three relevant passages of a query are unrelated passages of no other query
    first_three = {d for _, docs in SAMPLE for d in docs[:3]}
    assert all(d not in first_three for _, docs in SAMPLE for d in docs[3:])


@pytest.mark.core
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
    """On zero-shot SmolLM2's own fp32 scores (near-ties: it barely ranks), noise the size
    of a q8_0 conversion's error drags Spearman on the old 8-pair sample far below the
    converter's verdict line (MIN_SPEARMAN); on the new sample no draw crosses it."""
    old = worst_spearman_under_noise(reference_scores("smollm2-135m", OLD_SAMPLE), CONVERSION_ERROR)
    new = worst_spearman_under_noise(reference_scores("smollm2-135m", SAMPLE), CONVERSION_ERROR)
    assert old < 0.5, old  # the old sample: a verdict by luck (measured 0.10)
    assert new > MIN_SPEARMAN + 0.05, new  # measured 0.91


@pytest.mark.slow
@pytest.mark.parametrize("to,quant", [("gguf", "q8_0"), ("onnx", "int4")])
def test_smollm2_round_trips_rank_like_the_source_on_the_builtin_sample(smollm2_path, tmp_path, to, quant):
    """Verified on the built-in sample (conftest's ``builtin_verification_sample``) whether
    or not ../shared is beside the checkout, so this verdict is the same on every machine.
    Measured on Sapphire Rapids: q8_0 (llama.cpp) Spearman 0.93, tau-b 0.79, difference
    over spread 0.34; int4 (edgerank) 0.9995, 0.99, 0.08. A broken conversion (q4_0 of
    SmolLM2's Q4_1 grid) measured 0.16, 0.14 and 6.8."""
    from edgerank.converters import convert

    out = tmp_path / ("s.gguf" if to == "gguf" else "s")
    report = convert(smollm2_path, to, quant, out, progress=False)
    assert report["pairs"] == 64
    assert report["spearman"] >= MIN_SPEARMAN and report["kendall_tau_b"] >= 0.6, report
    assert report["diff_over_spread"] <= 0.7, report


@pytest.mark.skipif(not DL19.is_dir(), reason="needs ../shared/data/trec-dl19 (the judged DL19 data)")
def test_a_conversion_verifies_on_the_built_in_sample_whatever_lies_beside_the_checkout():
    """The same 64 pairs on every machine: a conversion's verdict never depends on whether
    ../shared/data sits beside the checkout (the CLI once read DL19's BM25 candidates there)."""
    import edgerank.converters.verify as verify

    assert not hasattr(verify, "DL19") and not hasattr(verify, "sample_pairs")
    assert "SAMPLE" in open(verify.__file__).read()