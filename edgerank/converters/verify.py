"""Score the built-in sample (``sample.SAMPLE``: 64 query-passage pairs) with the full-precision
source and the converted model, and say how far they agree. The same pairs on every machine,
with or without judged data beside the checkout, so a conversion's verdict never depends on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerank.converters.sample import SAMPLE
from edgerank.metrics import kendall_tau, precision_at_k_vs, spearman

def compare(reference, converted, pairs) -> dict:
    """Agreement of two Rerankers over ``pairs``: rank correlations, top-10, differences.

    Spearman alone misleads where the source's scores nearly tie (a 0.03 difference can
    reorder scores 0.01 apart), so the report also carries Kendall's tau-b and
    ``diff_over_spread``: the RMS score difference over the standard deviation of the
    source's scores, 0 for a perfect copy, about 1.4 for unrelated scores."""
    return agreement(scores(reference, pairs), scores(converted, pairs))


def scores(reranker, pairs) -> list[np.ndarray]:
    """``reranker``'s scores of each query's documents in ``pairs``."""
    return [np.asarray(reranker.score(query, docs)) for query, docs in pairs]


def agreement(reference: list[np.ndarray], converted: list[np.ndarray]) -> dict:
    """:func:`compare`'s figures from the two models' per-query scores."""
    agree = [precision_at_k_vs(list(np.argsort(-b, kind="stable")), list(np.argsort(-a, kind="stable")), 10)
             for a, b in zip(reference, converted)]
    ref, got = np.concatenate(reference), np.concatenate(converted)
    return {
        "pairs": int(len(ref)),
        "spearman": spearman(ref, got),
        "pearson": float(np.corrcoef(ref, got)[0, 1]),
        "topk_agreement": float(np.mean(agree)),
        "kendall_tau_b": kendall_tau(ref, got),
        "max_abs_diff": float(np.max(np.abs(ref - got))),
        "diff_over_spread": float(np.sqrt(np.mean((ref - got) ** 2)) / max(float(np.std(ref)), 1e-12)),
    }


FIT_SPEARMAN = 0.95  # an extra form must rank the sample like the artifact's own to be run unasked


def form_fit(artifact: Path, family: str, own: str, form: str) -> dict:
    """Whether ``form`` of an artifact ranks like its ``own`` form on the built-in sample
    (unpruned): int8 activations (then one scale per chunk; now per token) wreck a model whose activations have
    outlier channels (SmolLM2: Spearman 0.29; MiniLM: 0.996, RESULTS §18.4), so each
    model's int8 form is checked at conversion and offered only where it holds."""
    from edgerank.runtime.reranker import Reranker
    from edgerank.runtime.sources import source_at

    def sample_scores(compute: str) -> list[np.ndarray]:
        # one form at a time, its layers streamed: a 3B model's two forms resident at once
        # took the conversion to 6,250 MB (RESULTS §13.1)
        with Reranker(source_at(artifact, family), pruning=False, compute=compute, verify=False,
                      stream_weights=True) as r:
            return scores(r, SAMPLE)

    figures = agreement(sample_scores(own), sample_scores(form))
    return {"spearman": round(figures["spearman"], 4), "kendall_tau_b": round(figures["kendall_tau_b"], 4),
            "pairs": figures["pairs"], "fit": figures["spearman"] >= FIT_SPEARMAN}
